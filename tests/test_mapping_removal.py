"""mapping.removal: series and instances deleted on the source leave the ImagingStudy, counts recomputed."""

from __future__ import annotations

from mapping import convert_study
from mapping.removal import remove_from_imaging_study
from tests.mapping_cases import CT_STUDY, MR_STUDY, dicomdir_instances


def _study(uid: str) -> dict:
    return convert_study(dicomdir_instances()[uid]).imaging_study


def test_a_deleted_series_leaves_the_study_and_the_counts_follow():
    study = _study(MR_STUDY)
    gone = study["series"][0]
    reduced = remove_from_imaging_study(study, series_uids=[gone["uid"]])
    assert [s["uid"] for s in reduced["series"]] == [s["uid"] for s in study["series"][1:]]
    assert reduced["numberOfSeries"] == study["numberOfSeries"] - 1
    assert reduced["numberOfInstances"] == study["numberOfInstances"] - gone["numberOfInstances"]


def test_a_deleted_instance_leaves_its_series_and_the_counts_follow():
    study = _study(CT_STUDY)
    series = study["series"][0]
    reduced = remove_from_imaging_study(study, instance_uids=[series["instance"][0]["uid"]])
    assert reduced["series"][0]["numberOfInstances"] == series["numberOfInstances"] - 1
    assert reduced["numberOfInstances"] == study["numberOfInstances"] - 1


def test_a_series_whose_last_instance_is_deleted_goes_too():
    study = _study(CT_STUDY)
    series = study["series"][1]
    reduced = remove_from_imaging_study(study, instance_uids=[i["uid"] for i in series["instance"]])
    assert series["uid"] not in {s["uid"] for s in reduced["series"]}
    assert reduced["numberOfSeries"] == study["numberOfSeries"] - 1


def test_nothing_left_is_none():
    study = _study(CT_STUDY)
    assert remove_from_imaging_study(study, series_uids=[s["uid"] for s in study["series"]]) is None


def test_removing_what_is_not_there_changes_nothing_and_the_input_is_not_modified():
    study = _study(MR_STUDY)
    before = repr(study)
    assert remove_from_imaging_study(study, series_uids=["1.2.3"], instance_uids=["1.2.3.4"]) == study
    remove_from_imaging_study(study, series_uids=[study["series"][0]["uid"]])
    assert repr(study) == before
