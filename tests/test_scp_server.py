"""The C-STORE handler's rules that need no network (scp.receive.handlers.StoreHandler with a stand-in event)."""

from __future__ import annotations

import logging
import struct
from io import BytesIO
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.data import get_testdata_file

from scp.receive.status import PROCESSING_FAILURE
from scp.receive.handlers import StoreHandler

pytestmark = pytest.mark.usefixtures("strict_pydicom")

EXPLICIT_LE = "1.2.840.10008.1.2.1"


class BrokenSpool:
    def store_deferred(self, study_uid, sop_uid, chunks):
        raise RuntimeError("a bug in the spool")


def store_event(path: str):
    """A C-STORE event as pynetdicom hands it over: the data set's bytes and the command's SOP Instance UID."""
    ds = pydicom.dcmread(path)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    (meta_length,) = struct.unpack_from("<L", raw, 140)
    request = SimpleNamespace(AffectedSOPInstanceUID=ds.SOPInstanceUID, DataSet=BytesIO(raw[144 + meta_length:]))
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="MODALITY  "))
    return SimpleNamespace(request=request, assoc=assoc, context=SimpleNamespace(transfer_syntax=EXPLICIT_LE)), ds


def test_an_unexpected_error_is_answered_with_a_failure_status_and_logged_with_the_instance(caplog):
    event, ds = store_event(get_testdata_file("CT_small.dcm"))
    handler = StoreHandler(BrokenSpool(), on_stored=lambda study, sop: None)
    try:
        with caplog.at_level(logging.ERROR, logger="scp.receive.handlers"):
            assert handler(event) == PROCESSING_FAILURE
    finally:
        handler.shutdown()
    (record,) = caplog.records
    assert "MODALITY" in record.getMessage() and ds.SOPInstanceUID in record.getMessage()


def test_every_status_and_rejection_the_node_sends_is_in_the_status_table():
    """scp.receive.status is the one place an administrator reads them: nothing answered is missing."""
    from scp.receive import status

    answered = {v for k, v in vars(status).items() if k.isupper() and isinstance(v, int)}
    rejections = {v for k, v in vars(status).items() if k.startswith("REJECT_")}
    assert answered and answered == set(status.DIMSE_STATUSES)
    assert rejections and rejections == set(status.ASSOCIATE_REJECTIONS)
