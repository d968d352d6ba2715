"""Every DIMSE status the node answers, and every A-ASSOCIATE-RJ it sends, in one table.

As pynetdicom's `status.py` does for the statuses it knows: a handler returns one of
these names, a test checks each on the wire, and this table is what a PACS
administrator reads to understand a sender's log.
"""

from __future__ import annotations

from types import MappingProxyType

# C-STORE and C-ECHO response statuses (PS3.7 C.4 general statuses, PS3.4 Table B.2-1 Storage)
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110  # an unexpected error while storing (a bug: logged with its traceback)
INVALID_SOP_INSTANCE = 0x0117  # the request's Affected SOP Instance UID is empty or missing
OUT_OF_RESOURCES = 0xA700  # the spool (or archive) could not be written: disk full, I/O error
DATA_SET_DOES_NOT_MATCH = 0xA900  # a required UID is missing, empty or not a valid UID
CANNOT_UNDERSTAND = 0xC000  # the data set cannot be parsed (cut short, not DICOM, bad deflate)

DIMSE_STATUSES = MappingProxyType({
    SUCCESS: ("Success", "the instance's header is on disk (fsync'ed) before this status is sent"),
    PROCESSING_FAILURE: ("Failure: Processing Failure", "unexpected error while storing; see the node's log"),
    INVALID_SOP_INSTANCE: ("Failure: Invalid SOP Instance", "the C-STORE request's Affected SOP Instance UID is "
                           "empty or missing"),
    OUT_OF_RESOURCES: ("Failure: Refused: Out of Resources", "the spool or archive could not be written"),
    DATA_SET_DOES_NOT_MATCH: ("Failure: Data Set Does Not Match SOP Class",
                              "StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID or SOPClassUID missing, "
                              "empty or not a valid UID"),
    CANNOT_UNDERSTAND: ("Failure: Cannot Understand", "the data set cannot be parsed (cut short, not DICOM), "
                                                       "or its header is larger than node.max_header_bytes "
                                                       "(inflated, for a deflated data set)"),
})

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4: result 1 rejected-permanent,
# source 1 DICOM UL service-user.
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # the peer's address is not allowed
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # calling AE title not recognized
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # called AE title not recognized
# result 2 rejected-transient, source 3 DICOM UL service-provider (presentation related),
# diagnostic 2 local-limit-exceeded: node.max_associations or max_associations_per_peer (retry later)
REJECT_LIMIT = (0x02, 0x03, 0x02)

ASSOCIATE_REJECTIONS = MappingProxyType({
    REJECT_NO_REASON: "rejected-permanent, service-user, no reason given (peer address not allowed)",
    REJECT_CALLING_AE: "rejected-permanent, service-user, calling AE title not recognized",
    REJECT_CALLED_AE: "rejected-permanent, service-user, called AE title not recognized",
    REJECT_LIMIT: "rejected-transient, service-provider (presentation), local limit exceeded "
                  "(node.max_associations or node.max_associations_per_peer; retry later)",
})
