"""Sources of instances other than the network: a folder of DICOM files (`convert`).

    folder      find files, read headers, group by study, convert, write with the disk sink's writer
"""
