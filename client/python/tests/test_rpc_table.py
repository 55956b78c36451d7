"""The RPC table both clients share (fibquant._rpc), no server: it covers every method of
KvCompressionService (or names it as not wrapped), each entry builds the method's request type and
converts its response type, both clients wrap every entry with the same parameters, and the shared
pieces behave: pagination, answer checking of the page streams, retries, profile recovery."""
from __future__ import annotations

import asyncio
import inspect
import json

import grpc
import numpy as np
import pytest

import fibquant
from fibquant import _rpc, pb
from fibquant._common import ClientOptions
from fibquant._streams import CompressCollector, DecompressCollector

SERVICE = pb.DESCRIPTOR.services_by_name["KvCompressionService"]

# Table entry -> the client methods that use it (the same names on Client and AsyncClient).
WRAPPERS = {
    "RegisterProfile": ["register_profile"], "GetProfile": ["get_profile"], "ListProfiles": ["list_profiles"],
    "GetCodebook": ["get_codebook"], "CompressPages": ["compress_pages", "compress"],
    "DecompressPages": ["decompress_pages", "decompress"], "GetReceipt": ["get_receipt"],
    "ListReceipts": ["list_receipts"], "EvaluateQuality": ["evaluate_quality"],
    "GetServerInfo": ["get_server_info"], "Health/Check": ["check_health"],
    "RegisterCalibration": ["register_calibration"], "GetCalibration": ["get_calibration"],
    "RecommendProfile": ["recommend_profile"],
}
DIGEST = "sha256:" + "ab" * 32
# Arguments each request builder is called with here (paged: remaining, page_token first).
SAMPLE_ARGS = {
    "RegisterProfile": ({"profile_id": "x"},), "GetProfile": (DIGEST,), "ListProfiles": (10, "t"),
    "GetCodebook": (DIGEST,), "CompressPages": (DIGEST, "f16"), "DecompressPages": ("f32", DIGEST),
    "GetReceipt": ("rcpt-1",), "ListReceipts": (2000, "t"),
    "EvaluateQuality": ([DIGEST], [], None, None, None, 0), "GetServerInfo": (),
    "RegisterCalibration": ('{"digest": "x"}',), "GetCalibration": (DIGEST,),
    "RecommendProfile": (np.zeros((4, 8), np.float32),),
}


def test_table_covers_every_service_method():
    methods = {m.name for m in SERVICE.methods}
    table = {name for name, r in _rpc.RPCS.items() if not r.path}
    assert not table & _rpc.NOT_WRAPPED
    assert table | _rpc.NOT_WRAPPED == methods, (sorted(methods - table - _rpc.NOT_WRAPPED),
                                                 sorted((table | _rpc.NOT_WRAPPED) - methods))
    assert SERVICE.full_name == _rpc.SERVICE
    assert set(WRAPPERS) == set(_rpc.RPCS)


@pytest.mark.parametrize("name", sorted(SAMPLE_ARGS))
def test_entry_matches_the_service_descriptor(name):
    rpc, method = _rpc.RPCS[name], SERVICE.methods_by_name[name]
    assert rpc.method == name and not rpc.path
    assert (rpc.kind == "stream") == method.client_streaming == method.server_streaming
    assert (rpc.kind == "paged") == ("page_token" in method.input_type.fields_by_name)
    assert rpc.timeout in {f.name for f in ClientOptions.__dataclass_fields__.values()}
    req = rpc.request(*SAMPLE_ARGS[name])
    assert req.DESCRIPTOR is method.input_type
    if rpc.recover is not None:
        assert rpc.recover(req) == DIGEST
    response = getattr(pb, method.output_type.name)
    if rpc.kind == "stream":
        assert rpc.result is {"CompressPages": CompressCollector, "DecompressPages": DecompressCollector}[name]
        assert rpc.result.method == name and req.WhichOneof("kind") == "header"
    elif name == "RegisterProfile":
        with pytest.raises(fibquant.FibquantError, match="no digest"):
            rpc.result(response())
        info = rpc.result(response(profile=pb.ProfileInfo(digest=DIGEST), already_registered=True))
        assert info.digest == DIGEST and info.already_registered
    else:
        rpc.result(response())  # an empty answer converts


def test_recovering_entries():
    """NOT_FOUND is recovered exactly for the calls that name one profile."""
    recovering = {name for name, r in _rpc.RPCS.items() if r.recover is not None}
    assert recovering == {"GetProfile", "GetCodebook", "CompressPages", "DecompressPages"}
    assert [n for n, r in _rpc.RPCS.items() if not r.retryable] == ["Health/Check"]


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", sorted(n for ns in WRAPPERS.values() for n in ns))
def test_both_clients_wrap_every_entry_alike(name):
    sync, coro = getattr(fibquant.Client, name), getattr(fibquant.AsyncClient, name)
    assert not inspect.iscoroutinefunction(sync) and inspect.iscoroutinefunction(coro)
    assert _params(sync) == _params(coro)


def test_pager_follows_tokens_until_limit_or_end():
    pager = _rpc.Pager(_rpc.LIST_RECEIPTS, 2500, profile_digest=DIGEST)
    sent = []
    pages = [(list(range(1000)), "a"), (list(range(1000)), "b"), (list(range(1000)), "c")]
    while (req := pager.next_request()) is not None:
        sent.append((req.page_size, req.page_token, req.profile_digest))
        pager.add(pages[len(sent) - 1])
    assert sent == [(1000, "", DIGEST), (1000, "a", DIGEST), (500, "b", DIGEST)]
    assert len(pager.items) == 2500  # the last page held more than asked for
    # An empty token or an empty page ends the listing.
    for last in (([1], ""), ([], "more")):
        pager = _rpc.Pager(_rpc.LIST_PROFILES, 100, page_size=1)
        pager.next_request()
        pager.add(([0], "x"))
        assert pager.next_request().page_token == "x"
        pager.add(last)
        assert pager.next_request() is None and pager.items == [0] + last[0]


def _page(kind, i, seq=None):
    resp = pb.CompressPagesResponse() if kind == "c" else pb.DecompressPagesResponse()
    resp.page.sequence = i if seq is None else seq
    resp.page.client_sequence = i
    resp.page.coordinates.token_count = 16
    if kind == "c":
        resp.page.frame = b"frame%d" % i
    else:
        resp.page.data = b"data%d" % i
        resp.page.profile_digest = DIGEST
    return resp


def _receipt(kind):
    resp = pb.CompressPagesResponse() if kind == "c" else pb.DecompressPagesResponse()
    resp.receipt.receipt_id = "r"
    return resp


def test_collectors_check_order_and_receipt():
    c = CompressCollector(keep_protos=True)
    assert c.answer(_page("c", 0), 0) and c.answer(_page("c", 1), 1) and not c.answer(_receipt("c"), 2)
    r = c.finish(2, 2)
    assert r.frames == [b"frame0", b"frame1"] and r.coordinates[0] == (0, 0, 0, 0, 16) and r.receipt.receipt_id == "r"
    assert [p.frame for p in r.pages] == r.frames and isinstance(r.pages[0], fibquant.CompressedPage)
    with pytest.raises(fibquant.InternalError, match="out of order"):
        CompressCollector().answer(_page("c", 1, seq=0), 1)
    with pytest.raises(fibquant.InternalError, match="two receipts"):
        c.answer(_receipt("c"), 2)
    with pytest.raises(fibquant.InternalError, match="out of order"):  # a page after the receipt
        c.answer(_page("c", 2), 2)
    with pytest.raises(fibquant.DataLossError, match="after 2 of 3 pages"):
        c.finish(3, 2)
    no_receipt = CompressCollector()
    no_receipt.answer(_page("c", 0), 0)
    with pytest.raises(fibquant.DataLossError, match="without a receipt"):
        no_receipt.finish(1, 1)
    d = DecompressCollector()
    d.answer(_page("d", 0), 0)
    r = d.finish(1, 1)  # a decompress stream's receipt is optional
    assert r.data == [b"data0"] and r.profile_digests == [DIGEST] and r.receipt is None and r.pages == []


class _Flaky:
    """Fails with UNAVAILABLE `failures` times, then answers."""

    def __init__(self, failures, error=fibquant.UnavailableError):
        self.failures, self.calls, self.error = failures, 0, error

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error("down", method="GetProfile")
        return "answer"


@pytest.fixture(params=["sync", "async"])
def attempts(request):
    """(client, run): run(rpc, request, fn) is client._attempts with fn as the call, on either client."""
    opts = dict(max_attempts=3, initial_backoff=0.001)
    if request.param == "sync":
        with fibquant.Client("127.0.0.1:1", **opts) as c:
            yield c, c._attempts
        return
    loop = asyncio.new_event_loop()

    async def make():
        return fibquant.AsyncClient("127.0.0.1:1", **opts)
    c = loop.run_until_complete(make())

    def run(rpc, req, fn):
        async def once():
            return fn()
        return loop.run_until_complete(asyncio.wait_for(c._attempts(rpc, req, once), 30))
    try:
        yield c, run
    finally:
        loop.run_until_complete(c.close())
        loop.close()


def test_retries_only_unavailable_and_only_idempotent_calls(attempts):
    _, run = attempts
    info = pb.GetServerInfoRequest()
    ok = _Flaky(2)
    assert run(_rpc.GET_SERVER_INFO, info, ok) == "answer" and ok.calls == 3
    down = _Flaky(3)
    with pytest.raises(fibquant.UnavailableError):
        run(_rpc.GET_SERVER_INFO, info, down)
    assert down.calls == 3  # max_attempts in all
    bad = _Flaky(1, fibquant.InvalidArgumentError)
    with pytest.raises(fibquant.InvalidArgumentError):
        run(_rpc.GET_SERVER_INFO, info, bad)
    assert bad.calls == 1
    probe = _Flaky(1)
    with pytest.raises(fibquant.UnavailableError):
        run(_rpc.HEALTH_CHECK, b"", probe)  # a probe has one attempt
    assert probe.calls == 1


def test_profile_recovery(attempts):
    """NOT_FOUND: re-raised for a digest the client does not hold; for one it holds, the spec is
    registered again and the call retried once; a digest change or a failed registration is an error."""
    client, run = attempts
    req = pb.GetProfileRequest(digest=DIGEST)
    missing = _Flaky(1, fibquant.NotFoundError)
    with pytest.raises(fibquant.NotFoundError):
        run(_rpc.GET_PROFILE, req, missing)
    assert missing.calls == 1
    spec = pb.RegisterProfileRequest(spec_json="{}")
    client._profiles.registered(spec, fibquant.ProfileInfo.from_proto(pb.ProfileInfo(digest=DIGEST)))
    registered = []

    def register_as(digest):
        def register(req, timeout=None):
            registered.append(req)
            return fibquant.ProfileInfo.from_proto(pb.ProfileInfo(digest=digest))
        return register
    client._register = _like_register(client, register_as(DIGEST))
    lost = _Flaky(1, fibquant.NotFoundError)
    assert run(_rpc.GET_PROFILE, req, lost) == "answer" and lost.calls == 2 and registered == [spec]
    gone = _Flaky(2, fibquant.NotFoundError)
    with pytest.raises(fibquant.NotFoundError):  # recovered once only
        run(_rpc.GET_PROFILE, req, gone)
    assert gone.calls == 2
    client._register = _like_register(client, register_as("sha256:" + "cd" * 32))
    with pytest.raises(fibquant.FailedPreconditionError, match="now has digest sha256:cdcd"):
        run(_rpc.GET_PROFILE, req, _Flaky(1, fibquant.NotFoundError))

    def refused(req, timeout=None):
        raise fibquant.PermissionDeniedError("no token", method="RegisterProfile")
    client._register = _like_register(client, refused)
    with pytest.raises(fibquant.PermissionDeniedError) as e:
        run(_rpc.GET_PROFILE, req, _Flaky(1, fibquant.NotFoundError))
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED and "re-registering profile" in e.value.message
    assert e.value.method == "RegisterProfile"


def test_profile_recovery_re_registers_the_held_calibration_first(attempts):
    """A held spec naming a calibration this client registered (or had stored by RecommendProfile):
    the calibration is registered again before the spec (a server that lost one lost both)."""
    client, run = attempts
    cal_digest = "sha256:" + "ef" * 32
    cal = pb.RegisterCalibrationRequest(calibration_json=json.dumps({"digest": cal_digest}))
    client._profiles.calibration_registered(cal, fibquant.RegisteredCalibration.from_proto(
        pb.RegisterCalibrationResponse(calibration_digest=cal_digest, created=True)))
    spec = pb.RegisterProfileRequest(spec_json=json.dumps({"profile_id": "c", "calibration_digest": cal_digest}))
    client._profiles.registered(spec, fibquant.ProfileInfo.from_proto(pb.ProfileInfo(digest=DIGEST)))
    calls = []

    def send(rpc, req, timeout=None):
        calls.append((rpc.method, req))
        return fibquant.RegisteredCalibration.from_proto(pb.RegisterCalibrationResponse(calibration_digest=cal_digest))

    def register(req, timeout=None):
        calls.append(("RegisterProfile", req))
        return fibquant.ProfileInfo.from_proto(pb.ProfileInfo(digest=DIGEST))
    client._send, client._register = _like_register(client, send), _like_register(client, register)
    lost = _Flaky(1, fibquant.NotFoundError)
    assert run(_rpc.GET_PROFILE, pb.GetProfileRequest(digest=DIGEST), lost) == "answer" and lost.calls == 2
    assert calls == [("RegisterCalibration", cal), ("RegisterProfile", spec)]
    book = client._profiles
    assert book.calibration_for(pb.RegisterProfileRequest(
        structured=pb.KvProfileSpec(calibration_digest=cal_digest))) is cal
    for other in ('{"calibration_digest": "sha256:00"}', "{}", "[1]", "not json"):
        assert book.calibration_for(pb.RegisterProfileRequest(spec_json=other)) is None
    stored = fibquant.Recommendation.from_proto(pb.RecommendProfileResponse(
        calibration_digest="sha256:11", calibration_json="{}", calibration_stored=True))
    assert book.recommended(stored) is stored
    assert book.calibration_for(pb.RegisterProfileRequest(
        spec_json='{"calibration_digest": "sha256:11"}')).calibration_json == "{}"
    unstored = fibquant.Recommendation.from_proto(pb.RecommendProfileResponse(calibration_digest="sha256:22"))
    book.recommended(unstored)
    assert book.calibration_for(pb.RegisterProfileRequest(spec_json='{"calibration_digest": "sha256:22"}')) is None


def _like_register(client, fn):
    """fn in place of the client's _register (a coroutine function on the AsyncClient)."""
    if isinstance(client, fibquant.AsyncClient):
        async def coro(*a, **kw):
            return fn(*a, **kw)
        return coro
    return fn


def test_both_clients_share_constructor_checks(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")

    async def make_async(**kw):
        return fibquant.AsyncClient("127.0.0.1:1", **kw)
    loop = asyncio.new_event_loop()
    try:
        for make in (lambda **kw: fibquant.Client("127.0.0.1:1", **kw),
                     lambda **kw: loop.run_until_complete(make_async(**kw))):
            with pytest.raises(fibquant.InvalidArgumentError, match="unknown client option 'windw'"):
                make(windw=4)
            with pytest.raises(fibquant.InvalidArgumentError, match="window must be an integer in"):
                make(window=0)
            c = make(token_file=token, unary_timeout=2.5)
            assert c._metadata == (("authorization", "Bearer s3cret"),) and c.options.unary_timeout == 2.5
            assert c.options.stream_timeout == ClientOptions().stream_timeout
            closed = c.close()
            if closed is not None:
                loop.run_until_complete(closed)
    finally:
        loop.close()


def test_recommend_request_sends_f32_rows_of_any_kind_and_strides():
    """The samples go out as the f32 values of [tokens, head_dim] rows whatever their dtype and
    strides (bf16 as uint16 bits, f16, a strided head of [tokens, heads, head_dim])."""
    rng = np.random.default_rng(7)
    kv = rng.standard_normal((12, 3, 8)).astype(np.float32)
    k, q = kv[:, 1, :], kv[::-1, 2, :]  # neither is contiguous
    want_k, want_q = np.ascontiguousarray(k).ravel(), np.ascontiguousarray(q).ravel()
    req = _rpc.recommend_request(k, queries=q, budget={"max_attention_tv": 0.2}, max_codebook_size=64,
                                 target_shape={"role": "key"}, profile_id_prefix="p", store_calibration=True)
    assert req.role == "key" and req.head_dim == 8 and not req.values
    assert np.array_equal(np.asarray(req.keys, np.float32), want_k)
    assert np.array_equal(np.asarray(req.queries, np.float32), want_q)
    assert req.budget.HasField("max_attention_tv") and not req.budget.HasField("max_logit_mse")
    assert req.max_codebook_size == 64 and req.target_shape_json == '{"role": "key"}' and req.store_calibration
    f16 = _rpc.recommend_request(k.astype(np.float16))
    assert np.array_equal(np.asarray(f16.keys, np.float32), want_k.astype(np.float16).astype(np.float32))
    bf16 = _rpc.recommend_request(fibquant.f32_to_bf16(k))
    assert np.array_equal(np.asarray(bf16.keys, np.float32), fibquant.bf16_to_f32(fibquant.f32_to_bf16(want_k)))
    # A value sample: role from the arguments, keys (attention weights) ride along.
    v = _rpc.recommend_request(keys=k, values=q, role="value")
    assert v.role == "value" and v.head_dim == 8 and len(v.keys) == len(v.values) == 96
    assert _rpc.recommend_request(values=q).role == "value"


@pytest.mark.parametrize("args, kwargs, match", [
    ((), {}, "needs values"),
    ((np.zeros((4, 8), np.float32),), {"role": "value"}, "needs values"),
    ((np.zeros((2, 4, 8), np.float32),), {}, r"keys must be one head's sample \[tokens, head_dim\]"),
    ((np.zeros((4, 8), np.float32), None, np.zeros((4, 16), np.float32)), {}, "queries has head_dim 16"),
    ((np.zeros((4, 8), np.int32),), {}, "int32 is not supported"),
    ((np.zeros((4, 8), np.float32),), {"budget": {"max_attention": 1}}, "budget"),
    ((np.zeros((4, 8), np.float32),), {"role": "query"}, "role must be"),
    ((np.zeros((4, 8), np.float32),), {"tokens_per_page": -1}, "RecommendProfile"),
    ((np.zeros((4, 8), np.float32),), {"target_shape": 3}, "RecommendProfile"),
])
def test_recommend_request_rejects_malformed_samples(args, kwargs, match):
    with pytest.raises(fibquant.InvalidArgumentError, match=match):
        _rpc.recommend_request(*args, **kwargs)


def test_calibration_request_takes_json_dict_bytes_or_results():
    text = '{"digest": "sha256:00"}'
    rec = fibquant.Recommendation.from_proto(pb.RecommendProfileResponse(calibration_json=text))
    cal = fibquant.Calibration.from_proto(pb.GetCalibrationResponse(calibration_json=text))
    for given in (text, text.encode(), rec, cal):
        assert _rpc.calibration_request(given).calibration_json == text
    assert _rpc.calibration_request({"digest": "sha256:00"}).calibration_json == '{"digest": "sha256:00"}'
    best = fibquant.RecommendedProfile.from_proto(pb.RecommendedProfile(spec_json='{"profile_id": "r"}'))
    assert _rpc.register_request(best).spec_json == '{"profile_id": "r"}'
    for bad in ("", 3, fibquant.Recommendation.from_proto(pb.RecommendProfileResponse())):
        with pytest.raises(fibquant.InvalidArgumentError, match="calibration must be"):
            _rpc.calibration_request(bad)
