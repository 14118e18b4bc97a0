"""What a user runs to submit and query jobs. Light: never imports torch."""
