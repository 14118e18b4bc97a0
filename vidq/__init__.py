"""vidq: distributed video classification with PyTorchVideo, Celery and SQL.

This package holds what producers and workers share (settings, errors, the SQL
schema, the Celery app's configuration, the CLI). It never imports torch.
"""

__version__ = "0.1.0"
