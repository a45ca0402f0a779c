"""The trusted supervisor side: grading one submission and whole batches."""
