"""A folder of the configuration is created when missing and refused, naming the setting, when unusable."""

import pytest

from scp.store.folders import UnusableFolderError, ensure_folder


def test_a_missing_folder_is_created_with_its_parents(tmp_path):
    assert ensure_folder(tmp_path / "a" / "b", "node.spool_dir").is_dir()


def test_a_file_where_the_folder_should_be_is_refused_naming_the_setting(tmp_path):
    (tmp_path / "spool").write_text("")
    with pytest.raises(UnusableFolderError, match=r"node\.spool_dir: .*spool is a file, not a folder"):
        ensure_folder(tmp_path / "spool", "node.spool_dir")


def test_a_folder_under_a_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / "plain").write_text("")
    with pytest.raises(UnusableFolderError, match=r"lies under the file .*plain"):
        ensure_folder(tmp_path / "plain" / "out", "node.output_dir")


def test_the_check_leaves_nothing_behind(tmp_path):
    ensure_folder(tmp_path, "node.output_dir")
    assert list(tmp_path.iterdir()) == []
