"""The typed results' one field mapping (fibquant.types._FromProto), no server: every result class
covers its message field for field, unset optional and message fields are None, repeated fields are
tuples, nested messages become their result class, and the per-class extras (ServerInfo dtypes by
name, ProfileInfo.already_registered) hold."""
from __future__ import annotations

import dataclasses

import pytest

import fibquant
from fibquant import pb

# Result class -> the message its from_proto reads (by name where they match).
MESSAGES = {
    fibquant.BuildStats: pb.BuildStats, fibquant.ProfileInfo: pb.ProfileInfo,
    fibquant.RotationParams: pb.RotationParams, fibquant.Codebook: pb.GetCodebookResponse,
    fibquant.PageCoordinates: pb.PageCoordinates, fibquant.PageMetrics: pb.PageMetrics,
    fibquant.CompressedPage: pb.CompressedPage, fibquant.DecodedPage: pb.DecodedPage,
    fibquant.Receipt: pb.Receipt, fibquant.ServerLimits: pb.ServerLimits,
    fibquant.ServerInfo: pb.GetServerInfoResponse, fibquant.QualityMetrics: pb.QualityMetrics,
    fibquant.QualityReport: pb.QualityReport,
    fibquant.RegisteredCalibration: pb.RegisterCalibrationResponse, fibquant.Calibration: pb.GetCalibrationResponse,
    fibquant.RecommendedProfile: pb.RecommendedProfile, fibquant.Recommendation: pb.RecommendProfileResponse,
}
CLIENT_ONLY_FIELDS = {"proto", "already_registered"}


def _result_classes():
    import fibquant.types as t
    return sorted((c for c in vars(t).values() if isinstance(c, type) and issubclass(c, t._FromProto)
                   and c is not t._FromProto), key=lambda c: c.__name__)


def test_every_result_class_is_listed():
    assert set(_result_classes()) == set(MESSAGES)


@pytest.mark.parametrize("cls", _result_classes(), ids=lambda c: c.__name__)
def test_result_fields_match_message_fields(cls):
    """A field added to the message (or renamed) must be added to its result class, and nested
    converters must point at the class of the field's message type."""
    fields = MESSAGES[cls].DESCRIPTOR.fields_by_name
    names = {f.name for f in dataclasses.fields(cls)} - CLIENT_ONLY_FIELDS
    assert names == set(fields), (sorted(names - set(fields)), sorted(set(fields) - names))
    for name, nested in cls._nested.items():
        assert fields[name].message_type is MESSAGES[nested].DESCRIPTOR, name
    for name, fd in fields.items():
        if fd.message_type is not None:
            assert name in cls._nested, f"{cls.__name__}.{name} is a message field without a result class"


def test_unset_optional_and_message_fields_are_none():
    empty = fibquant.PageMetrics.from_proto(pb.PageMetrics())
    assert empty.key_logit_mse is None and empty.attention_kl is None and empty.value_aggregation_mse is None
    assert empty.mse == 0.0 and empty.raw_reasons == ()
    set_zero = fibquant.PageMetrics.from_proto(pb.PageMetrics(key_logit_mse=0.0, attention_tv=0.25))
    assert set_zero.key_logit_mse == 0.0 and set_zero.attention_tv == 0.25 and set_zero.attention_kl is None
    page = fibquant.CompressedPage.from_proto(pb.CompressedPage(sequence=3))
    assert page.metrics is None and page.coordinates is None and page.sequence == 3


def test_nested_repeated_and_proto_kept():
    msg = pb.GetCodebookResponse(codebook_size=2, block_dim=1, codewords=[0.5, -0.5],
                                 rotation=pb.RotationParams(dim=4, signs=[1, -1, 1, -1]),
                                 build_stats=pb.BuildStats(cost=7))
    cb = fibquant.Codebook.from_proto(msg)
    assert cb.codewords == (0.5, -0.5) and isinstance(cb.codewords, tuple)
    assert isinstance(cb.rotation, fibquant.RotationParams) and cb.rotation.signs == (1, -1, 1, -1)
    assert cb.rotation.proto is msg.rotation and cb.build_stats.cost == 7 and cb.proto is msg
    assert cb.codewords_array().shape == (2, 1)
    # .proto is neither compared nor shown.
    other = fibquant.Codebook.from_proto(pb.GetCodebookResponse.FromString(msg.SerializeToString()))
    assert other == cb and "proto" not in repr(cb)
    report = fibquant.QualityReport.from_proto(pb.QualityReport(violations=["a", "b"],
                                                                metrics=pb.QualityMetrics(attention_tv=0.5)))
    assert report.violations == ("a", "b") and report.metrics.attention_tv == 0.5
    assert report.metrics.key_logit_mse is None


def test_per_class_extras():
    si = fibquant.ServerInfo.from_proto(pb.GetServerInfoResponse(
        dtypes=[pb.DTYPE_BF16, pb.DTYPE_F32], limits=pb.ServerLimits(max_page_bytes=9)))
    assert si.dtypes == ("bf16", "f32") and si.limits.max_page_bytes == 9
    msg = pb.ProfileInfo(digest="sha256:" + "0" * 64, head_dim=64)
    assert fibquant.ProfileInfo.from_proto(msg).already_registered is False
    again = fibquant.ProfileInfo.from_proto(msg, already_registered=True)
    assert again.already_registered is True and again.head_dim == 64 and again.build_stats is None
    assert again.proto is msg


def test_recommendation_best_and_documents():
    """best is the candidate at best_index, None for -1 (a budget nobody meets is an answer)."""
    cands = [pb.RecommendedProfile(profile_id="a", spec_json='{"profile_id": "a"}', qualifies=True,
                                   max=pb.QualityMetrics(attention_tv=0.1)),
             pb.RecommendedProfile(profile_id="b", reason="ratio 2 < 5")]
    rec = fibquant.Recommendation.from_proto(pb.RecommendProfileResponse(candidates=cands, best_index=0))
    assert rec.best is rec.candidates[0] and rec.best.spec == {"profile_id": "a"}
    assert rec.best.max.attention_tv == 0.1 and rec.best.mean is None
    none = fibquant.Recommendation.from_proto(pb.RecommendProfileResponse(candidates=cands, best_index=-1))
    assert none.best is None and none.candidates[1].reason == "ratio 2 < 5"
    assert fibquant.Recommendation.from_proto(pb.RecommendProfileResponse(best_index=3)).best is None
    cal = fibquant.Calibration.from_proto(pb.GetCalibrationResponse(calibration_json='{"digest": "sha256:00"}'))
    assert cal.digest == "sha256:00" and cal.document == {"digest": "sha256:00"}
