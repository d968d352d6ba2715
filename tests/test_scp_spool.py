"""The spool's rules, run against the file spool and the in-memory one (one shared test class)."""

from __future__ import annotations

import pytest

from scp.store.layout import is_safe_uid
from scp.store.spool import FileSpool, MemorySpool

STUDY = "1.2.3.4"


class SpoolRules:
    def make(self, tmp_path):
        raise NotImplementedError

    def test_a_stored_instance_is_listed_under_its_study(self, tmp_path):
        spool = self.make(tmp_path)
        spool.store(STUDY, "1.2.3.4.1", [b"abc", b"def"])
        spool.store(STUDY, "1.2.3.4.2", [b"x"])
        assert spool.studies() == {STUDY: {"1.2.3.4.1", "1.2.3.4.2"}}
        assert [i.data for i in spool.read(STUDY, ["1.2.3.4.1"])] == [b"abcdef"]
        assert spool.depth() == 1

    def test_storing_an_instance_again_replaces_it(self, tmp_path):
        spool = self.make(tmp_path)
        spool.store(STUDY, "1.2.3.4.1", [b"old"])
        spool.store(STUDY, "1.2.3.4.1", [b"new"])
        assert [i.data for i in spool.read(STUDY, ["1.2.3.4.1"])] == [b"new"]

    def test_remove_takes_only_the_versions_that_were_read(self, tmp_path):
        spool = self.make(tmp_path)
        spool.store(STUDY, "1.2.3.4.1", [b"first"])
        spool.store(STUDY, "1.2.3.4.2", [b"other"])
        read = {i.sop_uid: i.version for i in spool.read(STUDY, ["1.2.3.4.1", "1.2.3.4.2"])}
        spool.store(STUDY, "1.2.3.4.1", [b"sent again during the delivery"])
        assert spool.remove(STUDY, read) == 1
        assert spool.studies() == {STUDY: {"1.2.3.4.1"}}
        assert [i.data for i in spool.read(STUDY, ["1.2.3.4.1"])] == [b"sent again during the delivery"]

    def test_an_unreadable_file_is_set_aside_only_at_the_version_that_was_read(self, tmp_path):
        spool = self.make(tmp_path)
        spool.store(STUDY, "1.2.3.4.1", [b"garbled"])
        (garbled,) = spool.read(STUDY, ["1.2.3.4.1"])
        spool.store(STUDY, "1.2.3.4.1", [b"sent again during the delivery"])
        spool.mark_corrupt(STUDY, "1.2.3.4.1", garbled.version)
        assert [i.data for i in spool.read(STUDY, ["1.2.3.4.1"])] == [b"sent again during the delivery"]
        (resent,) = spool.read(STUDY, ["1.2.3.4.1"])
        spool.mark_corrupt(STUDY, "1.2.3.4.1", resent.version)
        assert spool.studies() == {}

    def test_a_study_whose_instances_were_all_removed_is_gone(self, tmp_path):
        spool = self.make(tmp_path)
        spool.store(STUDY, "1.2.3.4.1", [b"a"])
        spool.remove(STUDY, {i.sop_uid: i.version for i in spool.read(STUDY, ["1.2.3.4.1"])})
        assert spool.studies() == {}
        assert spool.depth() == 0

    def test_remove_can_move_the_files_elsewhere(self, tmp_path):
        spool = self.make(tmp_path)
        spool.store(STUDY, "1.2.3.4.1", [b"a"])
        spool.remove(STUDY, {i.sop_uid: i.version for i in spool.read(STUDY, ["1.2.3.4.1"])},
                     move_to=tmp_path / "aside")
        assert (tmp_path / "aside" / "1.2.3.4.1.dcm").read_bytes() == b"a"
        assert spool.studies() == {}

    def test_a_uid_that_is_not_a_safe_file_name_is_refused(self, tmp_path):
        spool = self.make(tmp_path)
        for study, sop in (("../etc", "1.2"), ("1.2", "1.2/3"), ("", "1.2"), ("1.2", "a.b")):
            with pytest.raises(ValueError, match="not a valid UID"):
                spool.store(study, sop, [b"x"])
        assert spool.studies() == {}


    def test_adopt_takes_instance_files_in_and_keeps_an_instance_it_already_holds(self, tmp_path):
        spool = self.make(tmp_path)
        spool.store(STUDY, "1.2.3.4.1", [b"sent again meanwhile"])
        elsewhere = tmp_path / "set-aside"
        elsewhere.mkdir()
        for sop, data in (("1.2.3.4.1", b"older copy"), ("1.2.3.4.2", b"kept aside")):
            (elsewhere / f"{sop}.dcm").write_bytes(data)
        assert spool.adopt(STUDY, sorted(elsewhere.iterdir())) == 1
        assert spool.studies() == {STUDY: {"1.2.3.4.1", "1.2.3.4.2"}}
        assert [i.data for i in spool.read(STUDY, ["1.2.3.4.1", "1.2.3.4.2"])] == [b"sent again meanwhile",
                                                                                  b"kept aside"]
        assert [p.name for p in elsewhere.iterdir()] == ["1.2.3.4.1.dcm"]  # not taken: left where it was

    def test_a_deferred_store_is_listed_at_once(self, tmp_path):
        spool = self.make(tmp_path)
        make_durable = spool.store_deferred(STUDY, "1.2.3.4.1", [b"abc"])
        make_durable()
        assert spool.studies() == {STUDY: {"1.2.3.4.1"}}


class TestFileSpool(SpoolRules):
    def make(self, tmp_path):
        return FileSpool(tmp_path / "spool")

    def test_the_layout_is_study_folder_and_sop_instance_file(self, tmp_path):
        spool = self.make(tmp_path)
        spool.store(STUDY, "1.2.3.4.1", [b"abc"])
        assert (tmp_path / "spool" / STUDY / "1.2.3.4.1.dcm").read_bytes() == b"abc"
        assert [p.name for p in (tmp_path / "spool" / STUDY).iterdir()] == ["1.2.3.4.1.dcm"]  # no temp left

    def test_temporary_files_of_an_interrupted_write_are_not_instances(self, tmp_path):
        spool = self.make(tmp_path)
        spool.store(STUDY, "1.2.3.4.1", [b"abc"])
        (tmp_path / "spool" / STUDY / ".1.2.3.4.2.123.tmp").write_bytes(b"half")
        assert spool.studies() == {STUDY: {"1.2.3.4.1"}}

    def test_a_failed_write_leaves_nothing_behind(self, tmp_path):
        spool = self.make(tmp_path)

        def chunks():
            yield b"start"
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            spool.store(STUDY, "1.2.3.4.1", chunks())
        assert not (tmp_path / "spool" / STUDY).exists()  # a refused first instance leaves no study folder
        assert spool.depth() == 0

    def test_recover_drops_what_a_killed_node_left_half_written(self, tmp_path):
        spool = self.make(tmp_path)
        spool.store(STUDY, "1.2.3.4.1", [b"abc"])
        (tmp_path / "spool" / STUDY / ".1.2.3.4.2.123.tmp").write_bytes(b"half")
        (tmp_path / "spool" / "1.2.9").mkdir()
        (tmp_path / "spool" / "1.2.9" / ".1.2.9.1.5.tmp").write_bytes(b"half")
        assert spool.recover() == 2
        assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == [STUDY]
        assert spool.studies() == {STUDY: {"1.2.3.4.1"}}

    def test_a_new_spool_object_finds_what_an_earlier_one_stored(self, tmp_path):
        self.make(tmp_path).store(STUDY, "1.2.3.4.1", [b"abc"])
        assert self.make(tmp_path).studies() == {STUDY: {"1.2.3.4.1"}}


class TestMemorySpool(SpoolRules):
    def make(self, tmp_path):
        return MemorySpool()


def test_safe_uids_are_digits_and_dots_up_to_64_characters():
    assert is_safe_uid("1.2.840.10008.5.1.4.1.1.2")
    assert not is_safe_uid("1" * 65)
    assert not is_safe_uid("1..2")
    assert not is_safe_uid("1.2 ")


def test_a_uid_ending_in_a_newline_is_not_safe():
    assert not is_safe_uid("1.2.3\n")
    assert not is_safe_uid("1.2.3\n4")
