"""K-Adapter data: record formats, preprocessing into model inputs, collators."""

from .records import DataFormatError, DataReport, RecordError, insert_markers, load_records

__all__ = ["DataFormatError", "DataReport", "RecordError", "insert_markers", "load_records"]
