#!/usr/bin/env bash
# End-to-end test of the real server as an operator uses it (docs/OPERATIONS.md runs the same
# commands): a throwaway CA and server certificate (scripts/gen-test-certs), fibquant-server with
# TLS and an admin token on 127.0.0.1 (ports chosen free by the server), `buf curl` (scripts/buf)
# through server reflection: list services, health, RegisterProfile (no token / wrong token / right
# token), a short CompressPages stream from real K vectors, DecompressPages of its frames, the
# receipt, server info; then /metrics scraped with curl and checked (counters moved, promtool), and
# SIGTERM with exit code 0.
# Usage: tls_e2e.sh <fibquant-server binary> <source dir>        (CTest passes both)
# Bounded: every client call has its own timeout, and the whole script runs under timeout(1).
set -euo pipefail
if [[ -z "${FQ_E2E_BOUNDED:-}" ]]; then
  FQ_E2E_BOUNDED=1 exec timeout --kill-after=10 240 "$0" "$@"
fi

server="${1:?usage: tls_e2e.sh <fibquant-server> <source-dir>}"
src="${2:?usage: tls_e2e.sh <fibquant-server> <source-dir>}"
buf="$src/scripts/buf"
work="$(mktemp -d "${TMPDIR:-/tmp}/fq-tls-e2e.XXXXXX")"
pid=""

cleanup() {
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "FAIL: tls_e2e did not finish within 240 s" >&2; exit 124' TERM

step() { echo "== $*"; }
fail() {
  echo "FAIL: $*" >&2
  if [[ -f "$work/server.log" ]]; then echo "--- server log:" >&2; cat "$work/server.log" >&2; fi
  exit 1
}
# Installs a Debian package when a tool is missing (as root or through sudo); returns 1 when it cannot.
ensure_tool() {
  local tool="$1" pkg="$2"
  command -v "$tool" >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 || return 1
  local sudo=""
  if [[ $(id -u) -ne 0 ]]; then command -v sudo >/dev/null 2>&1 && sudo="sudo -n" || return 1; fi
  echo "tls_e2e: installing Debian package $pkg for $tool"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      --no-install-recommends "$pkg"; } >"$work/apt-$pkg.log" 2>&1 || return 1
  command -v "$tool" >/dev/null 2>&1
}

ensure_tool openssl openssl || fail "openssl is required"
ensure_tool curl curl || fail "curl is required (Debian package curl)"
ensure_tool node nodejs || fail "node is required (Debian package nodejs)"
"$buf" --version >/dev/null || fail "scripts/buf could not install @bufbuild/buf from npm"

step "certificates and admin token"
"$src/scripts/gen-test-certs" "$work/certs" >/dev/null
token="e2e-admin-token-$(openssl rand -hex 16)"
(umask 077 && echo "$token" >"$work/admin-token")

step "start fibquant-server with TLS on 127.0.0.1"
"$server" --listen=127.0.0.1:0 --metrics-listen=127.0.0.1:0 --data-dir="$work/data" \
  --workers=2 --drain-seconds=10 \
  --tls-cert="$work/certs/server.crt" --tls-key="$work/certs/server.key" \
  --admin-token-file="$work/admin-token" >"$work/server.log" 2>&1 &
pid=$!
port=""
for _ in $(seq 1 600); do
  port="$(sed -n 's/.*serving .* on 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$work/server.log")"
  [[ -n "$port" ]] && break
  kill -0 "$pid" 2>/dev/null || fail "server exited during startup"
  sleep 0.1
done
[[ -n "$port" ]] || fail "server did not report its port within 60 s"
mport="$(sed -n 's|.*metrics on http://127\.0\.0\.1:\([0-9]*\)/metrics.*|\1|p' "$work/server.log")"
[[ -n "$mport" ]] || fail "server did not report its metrics port"
grep -q "(tls, admin token required" "$work/server.log" || fail "server is not in TLS + token mode"
echo "gRPC on 127.0.0.1:$port (TLS), metrics on 127.0.0.1:$mport"

url="https://127.0.0.1:$port"
svc="fibquant.v1.KvCompressionService"
bcurl() { timeout 60 "$buf" curl --protocol grpc --cacert "$work/certs/ca.crt" "$@"; }
# JSON field extraction with node (buf curl prints JSON; a stream prints one JSON object per message).
json() { node -e "$1" "$2"; }

step "list services through reflection"
services="$(bcurl --list-services "$url")"
echo "$services"
for s in "$svc" grpc.health.v1.Health grpc.reflection.v1.ServerReflection \
  grpc.reflection.v1alpha.ServerReflection; do
  grep -qx "$s" <<<"$services" || fail "service $s not listed"
done

step "list methods through reflection (every listed service must be described)"
methods="$(bcurl --list-methods "$url")" || fail "buf curl --list-methods failed: $methods"
for m in "$svc/CompressPages" grpc.health.v1.Health/Check grpc.health.v1.Health/Watch \
  grpc.reflection.v1.ServerReflection/ServerReflectionInfo; do
  grep -qx "$m" <<<"$methods" || fail "method $m not listed: $methods"
done

step "health (overall and $svc) described by reflection, no --schema"
for name in "" "$svc"; do
  out="$(bcurl -d "{\"service\":\"$name\"}" "$url/grpc.health.v1.Health/Check")"
  grep -q '"status": "SERVING"' <<<"$out" || fail "health '$name' not SERVING: $out"
done

step "plaintext to the TLS port is refused"
if timeout 30 "$buf" curl --protocol grpc --http2-prior-knowledge --list-services \
  "http://127.0.0.1:$port" >/dev/null 2>&1; then
  fail "plaintext client was served on the TLS port"
fi

step "RegisterProfile: no token -> unauthenticated, wrong token -> permission_denied"
spec_file="$work/spec.json"
cat >"$spec_file" <<'EOF'
{"profile_id": "e2e-keys-d64",
 "shape": {"role": "key", "attention_kind": "mha", "batch": 1, "layers": 1, "kv_heads": 1,
           "query_heads": 1, "tokens": 64, "head_dim": 64, "dtype": "f32", "rope_state": "pre_rope"},
 "axis_policy": "per_token", "tokens_per_page": 16,
 "fibquant": {"block_dim": 2, "codebook_size": 16, "seed": 7}}
EOF
# RegisterProfile takes the spec JSON as a string field.
json 'const fs=require("fs");process.stdout.write(JSON.stringify({specJson:fs.readFileSync(process.argv[1],"utf8")}))' \
  "$spec_file" >"$work/register.json"
out="$(bcurl -d @"$work/register.json" "$url/$svc/RegisterProfile" 2>&1 || true)"
grep -q '"code": "unauthenticated"' <<<"$out" || fail "no token: expected unauthenticated, got: $out"
out="$(bcurl -H "authorization: Bearer wrong-$token" -d @"$work/register.json" \
  "$url/$svc/RegisterProfile" 2>&1 || true)"
grep -q '"code": "permission_denied"' <<<"$out" || fail "wrong token: expected permission_denied, got: $out"

step "RegisterProfile with the admin token"
bcurl -H "authorization: Bearer $token" -d @"$work/register.json" "$url/$svc/RegisterProfile" \
  >"$work/registered.json" || fail "RegisterProfile failed: $(cat "$work/registered.json")"
digest="$(json 'const r=JSON.parse(require("fs").readFileSync(process.argv[1]));console.log(r.profile.digest)' \
  "$work/registered.json")"
[[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]] || fail "bad digest '$digest'"
echo "profile $digest"

step "RegisterProfile in structured form"
bcurl -H "authorization: Bearer $token" -d '{"structured": {"profileId": "e2e-structured",
    "fibquant": {"blockDim": 2, "codebookSize": 16, "seed": "8"},
    "shape": {"role": "key", "layers": 1, "kvHeads": 1, "tokens": 64, "headDim": 64},
    "pageGeometry": {"tokensPerPage": 16}}}' "$url/$svc/RegisterProfile" >"$work/structured.json" ||
  fail "structured RegisterProfile failed: $(cat "$work/structured.json")"
grep -q '"profileId": "e2e-structured"' "$work/structured.json" || fail "structured register: $(cat "$work/structured.json")"

step "CompressPages: 2 pages of 16 real K vectors (layer 0, head 0 of tests/data/L0_k.f32)"
# L0_k.f32 is float32 [64 tokens, 4 heads, 64 dims]; a page is token-major [16 tokens, 64 dims].
node -e '
const fs = require("fs");
const [file, digest] = process.argv.slice(1);
const data = fs.readFileSync(file), heads = 4, dim = 64, tpp = 16, row = dim * 4;
const lines = [JSON.stringify({header: {profileDigest: digest, inputDtype: "DTYPE_F32",
                                        returnPageMetrics: true, label: "tls_e2e"}})];
for (let p = 0; p < 2; p++) {
  const page = Buffer.alloc(tpp * row);
  for (let t = 0; t < tpp; t++) data.copy(page, t * row, (p * tpp + t) * heads * row, ((p * tpp + t) * heads + 1) * row);
  lines.push(JSON.stringify({page: {coordinates: {tokenStart: p * tpp, tokenCount: tpp},
                                    data: page.toString("base64"), clientSequence: String(p + 1)}}));
}
console.log(lines.join("\n"));' "$src/tests/data/L0_k.f32" "$digest" >"$work/compress.jsonl"
bcurl -d @- "$url/$svc/CompressPages" <"$work/compress.jsonl" >"$work/compressed.out" 2>&1 ||
  fail "CompressPages failed: $(cat "$work/compressed.out")"
# buf curl prints each response as a pretty JSON object; split them back into an array.
summary="$(node -e '
const text = require("fs").readFileSync(process.argv[1], "utf8");
const objs = []; let depth = 0, start = -1, inStr = false, esc = false;
for (let i = 0; i < text.length; i++) {
  const c = text[i];
  if (inStr) { if (esc) esc = false; else if (c === "\\") esc = true; else if (c === "\"") inStr = false; continue; }
  if (c === "\"") inStr = true;
  else if (c === "{") { if (depth++ === 0) start = i; }
  else if (c === "}") { if (--depth === 0) objs.push(JSON.parse(text.slice(start, i + 1))); }
}
const pages = objs.filter(o => o.page), receipts = objs.filter(o => o.receipt);
if (pages.length !== 2 || receipts.length !== 1) { console.log("BAD " + objs.length); process.exit(0); }
require("fs").writeFileSync(process.argv[2], pages.map(p => JSON.stringify({frame: {frame: p.page.frame,
  clientSequence: p.page.clientSequence}})).join("\n") + "\n");
const r = receipts[0].receipt;
console.log([r.receiptId, r.pages, r.inputBytes, r.outputBytes, r.compressionRatio].join(" "));
' "$work/compressed.out" "$work/frames.jsonl")"
[[ "$summary" != BAD* ]] || fail "expected 2 pages and 1 receipt, got: $(cat "$work/compressed.out")"
read -r receipt_id rpages rin rout ratio <<<"$summary"
echo "receipt $receipt_id: pages=$rpages in=$rin out=$rout ratio=$ratio"
[[ "$rpages" == 2 && "$rin" == 8192 ]] || fail "receipt counts wrong: $summary"

step "DecompressPages of the 2 frames"
{ echo '{"header": {"outputDtype": "DTYPE_F32"}}'; cat "$work/frames.jsonl"; } >"$work/decompress.jsonl"
bcurl -d @- "$url/$svc/DecompressPages" <"$work/decompress.jsonl" >"$work/decompressed.out" 2>&1 ||
  fail "DecompressPages failed: $(cat "$work/decompressed.out")"
# Two pages of 16 x 64 f32 values each come back.
sizes="$(json 'const t=require("fs").readFileSync(process.argv[1],"utf8");
console.log([...t.matchAll(/"data": "([^"]*)"/g)].map(m => Buffer.from(m[1], "base64").length).join(" "))' \
  "$work/decompressed.out")"
[[ "$sizes" == "4096 4096" ]] || fail "expected 2 decoded pages of 4096 bytes, got '$sizes': $(cat "$work/decompressed.out")"

step "GetReceipt, ListReceipts, GetProfile, ListProfiles, GetCodebook, GetServerInfo"
bcurl -d "{\"receiptId\":\"$receipt_id\"}" "$url/$svc/GetReceipt" | grep -q "\"receiptId\": \"$receipt_id\"" ||
  fail "GetReceipt did not return $receipt_id"
bcurl -d '{}' "$url/$svc/ListReceipts" | grep -q "\"receiptId\": \"$receipt_id\"" ||
  fail "ListReceipts misses $receipt_id"
bcurl -d "{\"digest\":\"$digest\"}" "$url/$svc/GetProfile" | grep -q '"profileId": "e2e-keys-d64"' ||
  fail "GetProfile did not return e2e-keys-d64"
bcurl -d '{}' "$url/$svc/ListProfiles" | grep -q "\"digest\": \"$digest\"" || fail "ListProfiles misses $digest"
bcurl -d "{\"digest\":\"$digest\"}" "$url/$svc/GetCodebook" >"$work/codebook.json"
codewords="$(json 'const r=JSON.parse(require("fs").readFileSync(process.argv[1]));console.log(r.codewords.length)' \
  "$work/codebook.json")"
[[ "$codewords" == 32 ]] || fail "GetCodebook: expected 16 x 2 codeword values, got $codewords"
info="$(bcurl -d '{}' "$url/$svc/GetServerInfo")"
grep -q '"registeredProfiles": 2' <<<"$info" || fail "GetServerInfo: $info"

step "scrape /metrics"
metrics="$(timeout 30 curl -fsS "http://127.0.0.1:$mport/metrics")"
expect_metric() {  # exact series line prefix, minimum value
  local series="$1" min="$2" value
  value="$(grep -v "^#" <<<"$metrics" | grep -F "$series " | awk '{print $NF}' | head -1)"
  [[ -n "$value" ]] || fail "metric $series absent"
  awk -v v="$value" -v m="$min" 'BEGIN { exit !(v + 0 >= m + 0) }' || fail "metric $series = $value < $min"
  echo "$series $value"
}
expect_metric 'fibquant_rpc_handled_total{code="UNAUTHENTICATED",method="RegisterProfile"}' 1
expect_metric 'fibquant_rpc_handled_total{code="PERMISSION_DENIED",method="RegisterProfile"}' 1
expect_metric 'fibquant_rpc_handled_total{code="OK",method="RegisterProfile"}' 2
expect_metric 'fibquant_pages_total{op="compress"}' 2
expect_metric 'fibquant_pages_total{op="decompress"}' 2
expect_metric 'fibquant_payload_bytes_total{direction="raw_in"}' 8192
expect_metric 'fibquant_vectors_total{kind="compressed"}' 1
expect_metric 'fibquant_registry_profiles' 2
expect_metric 'fibquant_streams_started_total' 2

step "promtool check metrics"
if ensure_tool promtool prometheus; then
  promtool check metrics <<<"$metrics" || fail "promtool check metrics rejected /metrics"
  echo "promtool: ok"
else
  echo "SKIP: promtool check (promtool missing and the Debian package prometheus cannot be installed here)"
fi

step "SIGTERM drains and exits 0"
kill -TERM "$pid"
code=0
for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && fail "server still running 60 s after SIGTERM"
wait "$pid" || code=$?
pid=""
[[ "$code" == 0 ]] || fail "exit code $code after SIGTERM"
grep -q "received SIGTERM, draining" "$work/server.log" || fail "no drain log line"
echo "PASS: tls_e2e"
