"""DICOM encoding at the byte level, shared by the receiver, the spool and the folder converter.

    elements    the one walker of DICOM data elements (top level, sequences, items, fragments)
"""
