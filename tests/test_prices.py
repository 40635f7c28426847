"""Prices: the shipped snapshot, live refresh from RunPod and Lambda (fake servers on 127.0.0.1 answering in
the providers' documented JSON shapes, see providers.md), retries, errors, the per-user cache, `ftl prices`."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from launcher.cloud import get_provider
from launcher.cloud import prices as P
from launcher.cloud.http import ATTEMPTS
from launcher.spec.catalog import gpus
from tests.fake_providers import FakeLambda, FakeRunPod
from tests.openapi_check import document

ROOT = Path(__file__).resolve().parent.parent
RP_KEY = "rpa_SECRET_runpod_key_1234567890"
LM_KEY = "secret_lambda_key_abcdef0987654321"

RUNPOD_GPUS = {"gpus": [
    {"id": "NVIDIA H100 80GB HBM3", "name": "H100 SXM", "pool": "HOPPER_80", "manufacturer": "NVIDIA", "memory": 80,
     "secure": True, "community": True, "price": {"secure": 2.99, "community": 2.49, "serverless": 4.18},
     "maxCount": {"secure": 8, "community": 8}},
    {"id": "NVIDIA GeForce RTX 4090", "name": "RTX 4090", "pool": "ADA_24", "manufacturer": "NVIDIA", "memory": 24,
     "secure": True, "community": True, "price": {"secure": 0.44, "community": 0.31, "serverless": 1.1},
     "maxCount": {"secure": 8, "community": 4}},
    {"id": "NVIDIA A100-SXM4-80GB", "name": "A100 SXM", "pool": "AMPERE_80", "manufacturer": "NVIDIA", "memory": 80,
     "secure": True, "community": False, "price": {"secure": 1.74, "community": 0.0, "serverless": 2.72},
     "maxCount": {"secure": 8, "community": 0}},
    {"id": "NVIDIA A100 80GB PCIe", "name": "A100 PCIe", "pool": "AMPERE_80", "manufacturer": "NVIDIA", "memory": 80,
     "secure": True, "community": True, "price": {"secure": 1.64, "community": 1.19, "serverless": 2.72},
     "maxCount": {"secure": 8, "community": 8}},
    {"id": "NVIDIA RTX PRO 6000 Blackwell", "name": "RTX PRO 6000", "pool": "BLACKWELL_96", "manufacturer": "NVIDIA",
     "memory": 96, "secure": True, "community": False, "price": {"secure": 1.84, "community": 0.0, "serverless": 2.5},
     "maxCount": {"secure": 8, "community": 0}},
]}


def _lambda_type(name, desc, gpu_desc, cents, n):
    return {"instance_type": {"name": name, "description": desc, "gpu_description": gpu_desc,
                              "price_cents_per_hour": cents,
                              "specs": {"vcpus": 26 * n, "memory_gib": 225 * n, "storage_gib": 2750 * n, "gpus": n}},
            "regions_with_capacity_available": [{"name": "us-west-1", "description": "California, USA"}]}


LAMBDA_TYPES = {"data": {
    "gpu_8x_h100_sxm5": _lambda_type("gpu_8x_h100_sxm5", "8x H100 (80 GB SXM5)", "H100 (80 GB SXM5)", 2392, 8),
    "gpu_1x_h100_sxm5": _lambda_type("gpu_1x_h100_sxm5", "1x H100 (80 GB SXM5)", "H100 (80 GB SXM5)", 329, 1),
    "gpu_1x_a100_sxm4": _lambda_type("gpu_1x_a100_sxm4", "1x A100 (40 GB SXM4)", "A100 (40 GB SXM4)", 129, 1),
    "gpu_1x_gh200": _lambda_type("gpu_1x_gh200", "1x GH200 (96 GB)", "GH200 (96 GB)", 149, 1),
    "cpu_4x_general": {"instance_type": {"name": "cpu_4x_general", "description": "4x CPU", "gpu_description": "",
                                         "price_cents_per_hour": 20, "specs": {"vcpus": 4, "memory_gib": 16,
                                                                               "storage_gib": 0, "gpus": 0}},
                       "regions_with_capacity_available": []},
}}


class Fake:
    """A provider on 127.0.0.1: a queue of scripted failures, then the documented success body; every answer is
    checked against the provider's OpenAPI document (tests/providers_openapi/)."""

    def __init__(self, kind: str):
        self.kind, self.failures, self.requests, self.problems = kind, [], [], []
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body, ctype="application/json", headers=None):
                fake.problems += document(fake.kind).response_problems("GET", self.path.split("?")[0], code, body, ctype)
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                fake.requests.append((self.path, dict(self.headers)))
                auth = self.headers.get("Authorization", "")
                if fake.kind == "runpod":
                    if self.path != "/v2/catalog/gpus":
                        return self._send(404, {"title": "Not Found", "status": 404, "detail": "resource not found"},
                                          "application/problem+json")
                    if auth != f"Bearer {RP_KEY}":
                        return self._send(401, {"title": "Unauthorized", "status": 401, "detail": "missing bearer token"},
                                          "application/problem+json")
                else:
                    if self.path != "/api/v1/instance-types":
                        return self._send(404, {"error": {"code": "global/object-does-not-exist", "message": "Not found"}})
                    if auth != f"Bearer {LM_KEY}":
                        return self._send(401, {"error": {"code": "global/invalid-api-key",
                                                          "message": "API key was invalid, expired, or deleted.",
                                                          "suggestion": "Check your API key or create a new one, then try again."}})
                if fake.failures:
                    code = fake.failures.pop(0)
                    if fake.kind == "runpod":
                        detail = "rate limit exceeded for the minute window" if code == 429 else "upstream exploded"
                        return self._send(code, {"title": "Error", "status": code, "detail": detail},
                                          "application/problem+json", {"Retry-After": "0"} if code == 429 else None)
                    return self._send(code, {"error": {"code": "global/unknown", "message": "Something unexpected occurred"}},
                                      headers={"Retry-After": "0"} if code == 429 else None)
                return self._send(200, RUNPOD_GPUS if fake.kind == "runpod" else LAMBDA_TYPES)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    rp, lm = Fake("runpod"), Fake("lambda")
    monkeypatch.setenv("FTL_RUNPOD_API_URL", rp.url)
    monkeypatch.setenv("FTL_LAMBDA_API_URL", lm.url)
    monkeypatch.setenv("RUNPOD_API_KEY", RP_KEY)
    monkeypatch.setenv("LAMBDA_API_KEY", LM_KEY)
    monkeypatch.setenv("FTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FTL_PRICES_BACKOFF_S", "0.01")
    yield rp, lm
    rp.close()
    lm.close()
    assert not rp.problems and not lm.problems, rp.problems + lm.problems


# --- shipped data ----------------------------------------------------------------------------------


def test_shipped_prices_are_complete_and_use_catalog_keys():
    rows = P.shipped()
    assert {(r.provider, r.tier) for r in rows} == {("runpod", "secure"), ("runpod", "community"), ("lambda", "on-demand")}
    for r in rows:
        assert r.gpu in gpus(), r
        assert 0 < r.usd_per_gpu_hour < 20, r
        assert r.source.startswith("https://") and dt.date.fromisoformat(r.date)
        assert not r.live
    keys = {r.gpu for r in rows}
    assert {"a100-80gb", "h100-sxm", "h100-pcie", "h200", "l40s", "rtx-4090", "b200"} <= keys


def test_every_shipped_price_has_its_own_date_and_source():
    """No shipped price without the day it was read and a public source for it (per row, not per block)."""
    data = P._shipped_data()
    for provider, block in data.items():
        assert block["page"].startswith("https://"), provider
        for tier, table in block["tiers"].items():
            for gpu, row in table.items():
                assert set(row) <= {"usd", "date", "source", "type"}, (provider, tier, gpu)
                assert isinstance(row["date"], dt.date) and dt.date(2026, 9, 1) <= row["date"] <= dt.date.today()
                assert row["source"].startswith("https://"), (provider, tier, gpu)
                if provider == "lambda":
                    assert row["type"].startswith("gpu_"), gpu  # the instance the per-GPU price is of


def test_shipped_prices_match_the_shipped_cluster_profiles():
    import yaml

    for f in (ROOT / "cluster").glob("*.yaml"):
        d = yaml.safe_load(f.read_text())
        if d.get("provider") not in P.PROVIDERS:
            continue
        tier = d.get("cloud_type", "secure") if d["provider"] == "runpod" else "on-demand"
        p = P.lookup(d["provider"], d["gpu"], tier)
        assert p is not None and p.usd_per_gpu_hour == pytest.approx(d["price_per_gpu_hour"]), f.name


def test_staleness():
    p = P.Price("runpod", "secure", "h100-sxm", 2.0, "2026-01-01", "x")
    assert p.age_days(dt.date(2026, 1, 31)) == 30 and not p.stale(dt.date(2026, 1, 31))
    assert p.stale(dt.date(2026, 2, 1))


# --- live refresh ----------------------------------------------------------------------------------


def test_refresh_parses_both_providers_and_caches(fakes):
    rp, lm = fakes
    now = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.timezone.utc)
    s = P.refresh(now=now)
    assert s["runpod"]["ok"] and s["lambda"]["ok"], s
    assert s["runpod"]["unknown"] == ["NVIDIA RTX PRO 6000 Blackwell"] and s["lambda"]["unknown"] == ["gpu_1x_gh200"]
    assert rp.requests[0][1]["Authorization"] == f"Bearer {RP_KEY}"
    rows = {(r.provider, r.tier, r.gpu): r for r in P.all_prices()}
    h = rows[("runpod", "secure", "h100-sxm")]
    assert h.usd_per_gpu_hour == 2.99 and h.live and h.fetched_at == "2026-11-20T12:00:00+00:00" and h.date == "2026-11-20"
    assert h.provider_type == "NVIDIA H100 80GB HBM3"
    assert rows[("runpod", "community", "rtx-4090")].usd_per_gpu_hour == 0.31
    # two RunPod types map to a100-80gb: the lower price is kept, with the type it came from
    a = rows[("runpod", "secure", "a100-80gb")]
    assert a.usd_per_gpu_hour == 1.64 and a.provider_type == "NVIDIA A100 80GB PCIe"
    assert rows[("runpod", "community", "a100-80gb")].usd_per_gpu_hour == 1.19
    # Lambda: cents per instance -> USD per GPU; the cheaper per-GPU size wins
    lh = rows[("lambda", "on-demand", "h100-sxm")]
    assert lh.usd_per_gpu_hour == pytest.approx(2.99) and lh.provider_type == "gpu_8x_h100_sxm5"
    assert rows[("lambda", "on-demand", "a100-40gb")].usd_per_gpu_hour == pytest.approx(1.29)
    # shipped rows the live answer did not cover stay, with their snapshot date
    assert not rows[("runpod", "secure", "h200")].live
    assert not rows[("lambda", "on-demand", "b200")].live
    cache = P.cache_path()
    assert cache.is_file() and oct(cache.stat().st_mode & 0o777) == "0o600"
    text = cache.read_text()
    assert RP_KEY not in text and LM_KEY not in text
    assert json.loads(text)["runpod"]["fetched_at"] == "2026-11-20T12:00:00+00:00"


def test_429_then_200_is_retried(fakes):
    rp, _ = fakes
    rp.failures = [429, 429]
    rows, _ = P.fetch("runpod")
    assert len(rp.requests) == 3 and rows


def test_500_gives_the_providers_message_after_retries(fakes):
    rp, lm = fakes
    rp.failures = [500] * 10
    with pytest.raises(P.PriceError) as e:
        P.fetch("runpod")
    assert "upstream exploded" in str(e.value) and "after 4 attempts" in str(e.value)
    assert len(rp.requests) == ATTEMPTS and RP_KEY not in str(e.value)  # the providers' one retry policy
    lm.failures = [503] * 10
    with pytest.raises(P.PriceError, match="Something unexpected occurred"):
        P.fetch("lambda")


def test_bad_key_is_not_retried_and_shows_the_message(fakes, monkeypatch):
    _, lm = fakes
    monkeypatch.setenv("LAMBDA_API_KEY", "wrong-key-123")
    with pytest.raises(P.PriceError) as e:
        P.fetch("lambda")
    msg = str(e.value)
    assert "global/invalid-api-key" in msg and "API key was invalid" in msg and "LAMBDA_API_KEY" in msg
    assert "wrong-key-123" not in msg and len(lm.requests) == 1


def test_refresh_reads_the_key_from_credentials_yaml_as_launch_does(fakes, monkeypatch, tmp_path):
    """One credential lookup: a key only in credentials.yaml is used by `ftl prices --refresh` too."""
    rp, _ = fakes
    monkeypatch.delenv("RUNPOD_API_KEY")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "credentials.yaml").write_text(f"runpod:\n  api_key: {RP_KEY}\n")
    (cfg / "credentials.yaml").chmod(0o600)
    monkeypatch.setenv("FTL_CONFIG_DIR", str(cfg))
    rows, _ = P.fetch("runpod")
    assert rows and rp.requests[-1][1]["Authorization"] == f"Bearer {RP_KEY}"


def test_offers_and_prices_read_the_catalog_the_same_way(monkeypatch):
    """One parse (launcher.cloud.catalogs): the price `ftl prices --refresh` shows for a GPU and tier is the
    price of the offer `ftl launch` would rent, for one GPU, against the same fake RunPod and Lambda."""
    with FakeRunPod() as rp, FakeLambda() as lm:
        monkeypatch.setenv("FTL_RUNPOD_API_URL", rp.url)
        monkeypatch.setenv("RUNPOD_API_KEY", rp.key)
        monkeypatch.setenv("FTL_LAMBDA_API_URL", lm.url)
        monkeypatch.setenv("LAMBDA_API_KEY", lm.key)
        rows, _ = P.fetch("runpod")
        offers = get_provider("runpod").offers("rtx-4090")
        by_tier = {r.tier: r.usd_per_gpu_hour for r in rows if r.gpu == "rtx-4090"}
        assert by_tier == {o.cloud_type.lower(): o.price_per_hour for o in offers} == {"secure": 0.44, "community": 0.31}
        rows, _ = P.fetch("lambda", request_interval_s=0.0)
        offer = get_provider("lambda", request_interval_s=0.0).offers("h100-sxm", gpus=8)[0]
        assert [r.usd_per_gpu_hour for r in rows if r.gpu == "h100-sxm"] == [round(offer.price_per_hour / 8, 4)]


def test_missing_key_names_the_env_var(fakes, monkeypatch):
    monkeypatch.delenv("RUNPOD_API_KEY")
    with pytest.raises(P.PriceError, match="RUNPOD_API_KEY"):
        P.fetch("runpod")
    s = P.refresh(["runpod"])
    assert not s["runpod"]["ok"] and not P.cache_path().exists()


def test_unreachable_server_times_out_and_fails_cleanly(fakes, monkeypatch):
    monkeypatch.setenv("FTL_LAMBDA_API_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(P.PriceError, match="failed after 2 attempts"):
        P.fetch("lambda", attempts=2)


# --- the CLI ---------------------------------------------------------------------------------------


def _cli(*args, env=None):
    import os

    e = {**os.environ, **(env or {}), "COLUMNS": "200", "FTL_PRICES_BACKOFF_S": "0.01"}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=120)


def test_cli_refresh_shows_live_prices_and_never_the_key(fakes, tmp_path):
    rp, lm = fakes
    import os

    env = {k: os.environ[k] for k in ("FTL_RUNPOD_API_URL", "FTL_LAMBDA_API_URL", "RUNPOD_API_KEY", "LAMBDA_API_KEY",
                                      "FTL_CACHE")}
    res = _cli("prices", "--refresh", env=env)
    assert res.returncode == 0, res.stderr
    assert "live prices cached" in res.stderr and "live 20" in res.stdout
    res2 = _cli("prices", "--json", "--gpu", "H100 SXM", env=env)
    d = json.loads(res2.stdout)
    rows = {(r["provider"], r["tier"]): r for r in d["prices"]}
    assert rows[("runpod", "secure")]["usd_per_gpu_hour"] == 2.99 and rows[("runpod", "secure")]["live"]
    assert not rows[("runpod", "secure")]["stale"]
    for out in (res.stdout, res.stderr, res2.stdout, res2.stderr, Path(env["FTL_CACHE"], "prices.json").read_text()):
        assert RP_KEY not in out and LM_KEY not in out
    # a failing provider: a warning with its message, shipped prices still shown, exit 1
    lm.failures = [500] * 10
    env["FTL_LAMBDA_API_URL"] = "http://127.0.0.1:9"
    res3 = _cli("prices", "--refresh", "--provider", "lambda", env={**env, "FTL_CACHE": str(tmp_path / "c2")})
    assert res3.returncode == 1 and "lambda" in res3.stderr and "gpu_" not in res3.stderr
    assert "on-demand" in res3.stdout and LM_KEY not in res3.stdout + res3.stderr


def test_cli_missing_key_message(tmp_path):
    res = _cli("prices", "--refresh", "--provider", "runpod",
               env={"RUNPOD_API_KEY": "", "FTL_CACHE": str(tmp_path), "FTL_RUNPOD_API_URL": "http://127.0.0.1:9"})
    assert res.returncode == 1 and "set RUNPOD_API_KEY" in res.stderr and "secure" in res.stdout


def test_cli_staleness_warning_with_an_old_date(tmp_path, monkeypatch):
    """The shipped snapshot dated long ago warns; a fresh cached live price of the same provider does not."""
    old = dt.date.today() - dt.timedelta(days=45)
    fresh = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    cache = {
        "lambda": {"fetched_at": fresh, "prices": [
            {"provider": "lambda", "tier": "on-demand", "gpu": "h100-sxm", "usd_per_gpu_hour": 2.5,
             "date": fresh[:10], "source": "https://cloud.lambda.ai/api/v1/instance-types", "fetched_at": fresh,
             "provider_type": "gpu_8x_h100_sxm5"}]},
        "runpod": {"fetched_at": old.isoformat(), "prices": [
            {"provider": "runpod", "tier": "secure", "gpu": "h100-sxm", "usd_per_gpu_hour": 2.0,
             "date": old.isoformat(), "source": "https://api.runpod.io/v2/catalog/gpus",
             "fetched_at": old.isoformat() + "T00:00:00+00:00", "provider_type": "NVIDIA H100 80GB HBM3"}]},
    }
    (tmp_path / "prices.json").write_text(json.dumps(cache))
    res = _cli("prices", "--gpu", "h100-sxm", env={"FTL_CACHE": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert f"runpod prices dated {old.isoformat()} are more than 30 days old" in res.stderr
    assert "45 d" in res.stdout
    assert f"lambda prices dated {fresh[:10]}" not in res.stderr
    d = json.loads(_cli("prices", "--gpu", "h100-sxm", "--json", env={"FTL_CACHE": str(tmp_path)}).stdout)
    by = {(r["provider"], r["tier"]): r for r in d["prices"]}
    assert by[("runpod", "secure")]["stale"] and by[("runpod", "secure")]["age_days"] == 45
    assert not by[("lambda", "on-demand")]["stale"] and by[("lambda", "on-demand")]["usd_per_gpu_hour"] == 2.5
