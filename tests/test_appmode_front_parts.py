"""App mode's front, its parts without a federation: the nginx configuration (checked by nginx
itself), the log of refusals said once per node, and the submit token as flwr's credential."""

from __future__ import annotations

import base64
import logging
import re
import subprocess

import pytest

from services.appmode import flower, front
from services.certs import make_certificates

TOKEN = "t" * 64
needs_nginx = pytest.mark.skipif(front.nginx_program() is None, reason=front.NOT_INSTALLED)


def _plan(tls_dir: str | None, control: bool = True) -> front.Plan:
    return front.Plan("127.0.0.1:18080", 18000, tls_dir, "127.0.0.1:19095" if control else None, TOKEN if control else None)


def test_the_published_listener_forwards_exactly_the_supernodes_fleet_calls_and_logs_no_secret_header(tmp_path):
    conf = front.config(_plan(None), tmp_path)
    published = conf[conf.index("listen 127.0.0.1:18080"):conf.index("listen 127.0.0.1:19095")]
    forwarded = re.findall(r"location ~ \^/v1/fleet/\((.*)\)\$", published)
    assert forwarded and set(forwarded[0].split("|")) == set(front.FLEET_CALLS) and len(front.FLEET_CALLS) == 12
    assert "/v1/control" not in published and "/v1/runtime" not in published and "location / { return 404; }" in published
    assert "access_log off;" in conf
    logged = re.findall(r"\$http_(\w+)", conf.split("log_format", 1)[1].split(";", 1)[0])
    assert logged == ["flwr_public_key"]  # the refused node's public key; never its signature, timestamp or Authorization


def test_without_a_submit_token_there_is_no_control_listener(tmp_path):
    conf = front.config(_plan(None, control=False), tmp_path)
    assert "/v1/control" not in conf and TOKEN not in conf and conf.count("listen ") == 1


@needs_nginx
@pytest.mark.parametrize("tls", [False, True])
def test_nginx_accepts_the_configuration_with_and_without_tls(tmp_path, tls):
    tls_dir = None
    if tls:
        tls_dir = tmp_path / "tls"
        make_certificates(tls_dir, ["localhost"], ["127.0.0.1"], days=1)
    folder = tmp_path / "front"
    folder.mkdir(mode=0o700)
    conf = folder / "nginx.conf"
    conf.write_text(front.config(_plan(None if tls_dir is None else str(tls_dir)), folder))
    checked = subprocess.run([front.nginx_program(), "-t", "-p", str(folder), "-c", str(conf), "-e", "stderr"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_a_refused_node_is_said_once_per_address_and_key(tmp_path, caplog):
    key = base64.b64encode(b"-----BEGIN PUBLIC KEY-----\nstranger\n-----END PUBLIC KEY-----\n").decode()
    other = base64.b64encode(b"another key").decode()
    log = tmp_path / front.REFUSED_LOG
    refusals = front.Refusals(tmp_path)
    assert refusals.read() == []  # no log yet
    log.write_text(f"10.0.0.7 412 /v1/fleet/activate-node {key}\n10.0.0.7 412 /v1/fleet/activate-node {key}\n10.0.0.7 401 /v1/fleet/pull-messages {key}\n10.0.0.7 412 /v1/fleet/reg")
    with caplog.at_level(logging.WARNING, logger="bouquet.front"):
        first = refusals.read()
        with open(log, "a") as more:
            more.write(f"ister-node {other}\n10.0.0.8 412 /v1/fleet/activate-node {key}\n")
        second = refusals.read()
    name = front.fingerprint(base64.b64decode(key))
    assert first == [("10.0.0.7", name, 412, "/v1/fleet/activate-node")]
    assert second == [("10.0.0.7", front.fingerprint(b"another key"), 412, "/v1/fleet/register-node"), ("10.0.0.8", name, 412, "/v1/fleet/activate-node")]
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 3 and "refused a SuperNode from 10.0.0.7 (key " + name + ")" in said[0] and "not registered" in said[0]


def test_the_submit_token_is_the_credential_flwr_sends_as_a_bearer_token(tmp_path):
    from flwr.cli.auth_plugin import get_cli_plugin_class
    from flwr.cli.constant import AUTHN_TYPE_STORE_KEY
    from flwr.common.constant import ACCESS_TOKEN_KEY
    from flwr.supercore.credential_store.file_credential_store import FileCredentialStore

    home, address = tmp_path / "home", "server:9095"
    flower.write_cli_config(home, address, None, TOKEN)
    credentials = home / "credentials.yaml"
    assert credentials.stat().st_mode & 0o777 == 0o600
    store = FileCredentialStore(credentials)
    authn = store.get(AUTHN_TYPE_STORE_KEY % address).decode()
    plugin = get_cli_plugin_class(authn)(address)
    plugin.store = store
    plugin.load_tokens()
    assert dict(plugin.write_tokens_to_metadata([]))[ACCESS_TOKEN_KEY] == TOKEN
    flower.write_cli_config(home, address, None, None)
    assert not credentials.exists()  # no token: no credential left behind


def test_the_log_of_refusals_is_emptied_once_read_past_its_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(front, "REFUSED_LOG_CAP", 100)
    key = base64.b64encode(b"k").decode()
    log = tmp_path / front.REFUSED_LOG
    refusals = front.Refusals(tmp_path)
    log.write_text("".join(f"10.0.0.{n} 412 /v1/fleet/activate-node {key}\n" for n in range(5)))
    assert len(refusals.read()) == 5 and log.stat().st_size == 0 and refusals.offset == 0
    with open(log, "a") as more:
        more.write(f"10.0.0.9 412 /v1/fleet/activate-node {key}\n")
    assert [address for address, *_ in refusals.read()] == ["10.0.0.9"]
