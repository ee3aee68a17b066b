"""Teachers, students and the surgery between them."""
