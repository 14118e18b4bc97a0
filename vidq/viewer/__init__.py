"""The results viewer: ``vidq serve`` (vidq/viewer/app.py) and ``vidq report``
(vidq/viewer/report.py) over the results database, read-only.

The queries (``data``) and thumbnails (``thumbs``) import neither Starlette nor
torch: ``vidq report`` needs only Jinja2 and PyAV.
"""
