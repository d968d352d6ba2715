"""Store: what the node keeps on disk (the lowest layer of scp, after scp.dicom).

    layout      the on-disk layout: every folder and file name and suffix, in one place
    files       atomic writes, fsync of files and folders, durable moves (written once)
    part10      the spool file format: header-only DICOM Part 10 files (writer and reader)
    spool       received instance headers per study until delivered (Spool protocol,
                FileSpool, MemorySpool)
    dead_letter studies set aside with their reason (requeue back into a spool)
    journal     deliveries.jsonl, writer and reader (rotated by size)
    folders     the node's folders checked before use (created, or one clear error)
"""
