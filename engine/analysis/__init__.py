"""Reading results back: scoring, score inputs, reports."""
