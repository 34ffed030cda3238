"""TLS on gRPC (issue 12): certificates made by scripts/make_certs.py, bad TLS folders refused
before anything starts, a federation over TLS, and every mismatch between client and server
named in one line that says TLS is the problem (gRPC alone retries until its timeout)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO
from services import settings, tls
from services.certs import make_certificates
from services.net import free_port, wait_until_listening


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tls") / "certs"
    make_certificates(folder, ["localhost"], ["127.0.0.1"])
    return folder


def run(*argv: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_make_certs_writes_a_ca_and_a_server_certificate_that_check_out_and_never_overwrites(tmp_path):
    out = tmp_path / "certs"
    made = run("scripts/make_certs.py", "--out", str(out), "--name", "server", "--ip", "127.0.0.1")
    assert made.returncode == 0, made.stderr
    files = tls.server_files(str(out))
    assert b"BEGIN CERTIFICATE" in files.ca and b"PRIVATE KEY" in files.private_key
    assert (out / "server.key").stat().st_mode & 0o077 == 0, "the server's key is readable by others"
    before = (out / "ca.crt").read_bytes()
    again = run("scripts/make_certs.py", "--out", str(out))
    assert again.returncode == 2 and "already holds" in again.stderr
    assert (out / "ca.crt").read_bytes() == before


def test_make_certs_leaves_what_the_replicas_read_readable_whatever_the_umask(tmp_path):
    """Issue 20: the replicas (uid 1000 in compose) read ca.crt from a folder another user made;
    a private umask must not make it unreadable, and must not widen the keys either."""
    out = tmp_path / "certs"
    made = subprocess.run([PYTHON, "scripts/make_certs.py", "--out", str(out), "--name", "server"], cwd=REPO,
                          capture_output=True, text=True, umask=0o077)
    assert made.returncode == 0, made.stderr
    modes = {path.name: path.stat().st_mode & 0o777 for path in (out, *out.iterdir())}
    assert modes == {"certs": 0o755, "ca.crt": 0o644, "server.crt": 0o644, "ca.key": 0o600, "server.key": 0o600}


def test_an_error_about_the_entrypoints_copy_names_the_folder_the_user_mounted(tmp_path, monkeypatch):
    monkeypatch.setenv(tls.SOURCE_ENV, "/tls")
    with pytest.raises(settings.SettingError, match=re.escape(f"{str(tmp_path)!r} (a private copy of '/tls'): ca.crt is missing")):
        tls.client_ca(str(tmp_path))


def broken(certificates: Path, tmp_path: Path, how: str) -> Path:
    folder = tmp_path / how
    shutil.copytree(certificates, folder)
    if how == "no key":
        (folder / "server.key").unlink()
    elif how == "other key":
        other = tmp_path / "other"
        make_certificates(other, ["localhost"], [])
        shutil.copy(other / "server.key", folder / "server.key")
    elif how == "other CA":
        other = tmp_path / "other"
        make_certificates(other, ["localhost"], [])
        shutil.copy(other / "ca.crt", folder / "ca.crt")
    elif how == "not a certificate":
        (folder / "server.crt").write_text("hello\n")
    return folder


@pytest.mark.parametrize(
    "how, says",
    [("no key", "server.key is missing"), ("other key", "is not the key of server.crt"),
     ("other CA", "is not signed by ca.crt"), ("not a certificate", "server.crt is not a PEM certificate")],
)
def test_a_bad_tls_folder_stops_the_server_before_it_starts(certificates, tmp_path, how, says):
    folder = broken(certificates, tmp_path, how)
    with pytest.raises(settings.SettingError, match=says):
        tls.server_files(str(folder))
    result = run("-m", "services.server", "--tls-dir", str(folder), "--results-dir", str(tmp_path / "results"))
    assert result.returncode == 2
    assert "FL_TLS_DIR" in result.stderr and says in result.stderr
    assert not (tmp_path / "results").exists(), "something was started"


def test_a_client_without_the_ca_file_exits_2_naming_the_setting(tmp_path):
    result = run("-m", "services.client", "--tls-dir", str(tmp_path), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    assert "FL_TLS_DIR" in result.stderr and "ca.crt is missing" in result.stderr


@pytest.mark.integration
def test_a_federation_runs_over_tls(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    results = tmp_path / "results"
    result = run("scripts/run_local.py", "--clients", "3", "--rounds", "2", "--tls", "--results-dir", str(results),
                 "--data-dir", str(tmp_path / "data"), timeout=300, env={"TMPDIR": str(temporary)})
    assert result.returncode == 0, result.stderr[-3000:]
    [run_folder] = [p for p in results.iterdir() if p.is_dir()]
    summary = json.loads((run_folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert "with TLS" in (run_folder / "logs" / "server.log").read_text()
    for index in range(3):
        assert "(TLS, workers" in (run_folder / "logs" / f"client-{index}.log").read_text()
    assert not list(temporary.glob("bouquet-tls-*")), "the throwaway certificates were left behind"


@pytest.fixture
def server(tmp_path, request):
    """A server that listens (with TLS or not, as the test's parameter says) and never gets clients."""
    address = f"127.0.0.1:{free_port()}"
    command = [PYTHON, "-m", "services.server", "--listen-address", address, "--min-clients", "5", "--join-timeout", "300",
               "--results-dir", str(tmp_path / "results"), "--data-dir", str(tmp_path / "data"), "--torch-threads", "1"]
    if request.param is not None:
        command += ["--tls-dir", str(request.getfixturevalue(request.param))]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_listening(address, process, timeout=120, name="server")
        yield address
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def untrusted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tls") / "untrusted"
    make_certificates(folder, ["localhost"], ["127.0.0.1"])
    return folder


@pytest.mark.integration
@pytest.mark.parametrize(
    "server, client_tls, says",
    [("certificates", None, "requires TLS and this client has no --tls-dir / FL_TLS_DIR"),
     ("certificates", "untrusted", "presented a certificate that --tls-dir / FL_TLS_DIR/ca.crt does not accept"),
     (None, "certificates", "did not answer a TLS handshake")],
    ids=["plaintext client, TLS server", "client trusts another CA", "TLS client, plaintext server"],
    indirect=["server"],
)
def test_a_tls_mismatch_ends_the_client_with_one_line_saying_so(server, client_tls, says, tmp_path, request):
    command = ["-m", "services.client", "--server-address", server, "--client-id", "c", "--data-dir", str(tmp_path / "data"),
               "--connect-timeout", "60"]
    if client_tls is not None:
        command += ["--tls-dir", str(request.getfixturevalue(client_tls))]
    result = run(*command, timeout=90)  # well within the connect timeout: the probe answers at once
    assert result.returncode == 1, result.stderr[-2000:]
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert "TLS" in line
