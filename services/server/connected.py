"""Who is connected to the server, and who may stay: each new gRPC connection is asked once for
its identity (and, with a join token, for proof of it); one that fails the token is refused and
sent off. ``services.server.membership`` decides what the identities told here get."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

from flwr.common import Code, GetPropertiesIns, ReconnectIns
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from services import joining, protocol
from services import settings as settings_module

log = logging.getLogger("bouquet.server")

IDENTITY_TIMEOUT_S = 5.0  # a new connection's answer to "who are you?" (an honest client answers in milliseconds)
MAX_UNVERIFIED = 16  # new connections asked at once; more wait for a later snapshot
REFUSAL_TIMEOUT_S = 5.0  # to tell a refused connection why and ask it to leave
SEND_OFF_THREADS = 4


@dataclass
class _Question:
    """An identity question in flight: asked in a pool thread, judged by the server's thread."""

    proxy: ClientProxy
    nonce: str | None
    future: Future
    deadline: float


class ConnectedClients:
    """The connected clients and their identities, each connection asked once (get_properties).

    Flower's client manager hands out its live dictionary, which gRPC threads change as clients
    come and go; every look here works on a copy taken in one step, and a client that vanishes
    while asked is skipped, not fatal. New connections are asked at once, side by side (at most
    MAX_UNVERIFIED at a time, each for up to IDENTITY_TIMEOUT_S), so silent or ever-reconnecting
    connections hold a snapshot up for one short timeout at most, never one timeout each; one
    not answered by then is judged by a later snapshot. With a join token, the question carries
    a fresh nonce and a connection whose answer does not prove the token is refused: counted,
    dropped from the client manager, and (in the background) told why, asked to disconnect and
    closed. A connection that cannot be used (no or a bad identity, no answer) is logged once
    and not asked again."""

    def __init__(self, client_manager: ClientManager, join_token: str | None = None, on_refused: Callable[[], None] = lambda: None) -> None:
        self.client_manager = client_manager
        self.join_token = join_token
        self.on_refused = on_refused
        self._identity_by_cid: dict[str, str] = {}
        self._unusable: set[str] = set()  # connections refused or ignored: logged once, never asked again
        self._proxies: dict[str, ClientProxy] = {}
        self._asking: dict[str, _Question] = {}
        self._questions = ThreadPoolExecutor(MAX_UNVERIFIED, thread_name_prefix="bouquet-identity")
        self._send_offs = ThreadPoolExecutor(SEND_OFF_THREADS, thread_name_prefix="bouquet-refusal")

    def snapshot(self) -> dict[str, str]:
        """{connection id: identity} of the clients connected now that have told it, in order of connection."""
        proxies = list(self.client_manager.all().items())  # one C-level copy: atomic under the GIL
        current = {cid for cid, _ in proxies}
        for gone in set(self._identity_by_cid) - current:
            del self._identity_by_cid[gone]
        self._unusable &= current
        self._proxies = dict(proxies)
        for cid, proxy in proxies:
            if len(self._asking) >= MAX_UNVERIFIED:
                break  # the others are asked by a later snapshot
            if cid not in self._identity_by_cid and cid not in self._unusable and cid not in self._asking:
                self._ask(proxy)
        if self._asking:
            last = max(question.deadline for question in self._asking.values())
            wait([question.future for question in self._asking.values()], timeout=max(0.0, last - time.monotonic()))
        for cid, question in list(self._asking.items()):  # a connection gone meanwhile is judged (and logged) too
            if question.future.done():
                del self._asking[cid]
                self._judge(question)
        return {cid: self._identity_by_cid[cid] for cid, _ in proxies if cid in self._identity_by_cid}

    def identities(self) -> set[str]:
        return set(self.snapshot().values())

    def proxy(self, cid: str) -> ClientProxy:
        return self._proxies[cid]

    def known(self, cid: str) -> str | None:
        """The identity a connection reported, without asking anyone."""
        return self._identity_by_cid.get(cid)

    def close(self) -> None:
        """Questions and send-offs still queued are dropped (the run is over); running ones end by their timeouts."""
        self._questions.shutdown(wait=False, cancel_futures=True)
        self._send_offs.shutdown(wait=False, cancel_futures=True)

    def _ask(self, proxy: ClientProxy) -> None:
        nonce = joining.new_nonce() if self.join_token else None
        ins = GetPropertiesIns(config={protocol.JOIN_NONCE: nonce} if nonce else {})
        future = self._questions.submit(proxy.get_properties, ins, IDENTITY_TIMEOUT_S, None)
        # The pool never has more questions than threads, so each starts now; a second of slack for the answer's way back.
        self._asking[proxy.cid] = _Question(proxy, nonce, future, time.monotonic() + IDENTITY_TIMEOUT_S + 1.0)

    def _judge(self, question: _Question) -> None:
        proxy, nonce = question.proxy, question.nonce
        try:
            reply = question.future.result()
        except Exception as error:  # a client that vanished (or never answered) while we asked
            self._ignore(proxy, f"could not ask it for its identity ({type(error).__name__}: {error})")
            return
        properties = reply.properties if reply.status.code == Code.OK else {}
        identity = properties.get(protocol.IDENTITY_PROPERTY)
        if nonce is not None:
            answer = properties.get(protocol.JOIN_PROOF)
            if answer is None:
                self._refuse(proxy, identity, "no join secret presented (the server requires FL_JOIN_TOKEN / FL_JOIN_TOKEN_FILE)")
                return
            if not isinstance(identity, str) or not joining.verified(self.join_token, nonce, identity, answer):
                self._refuse(proxy, identity, "wrong join secret")
                return
        if not isinstance(identity, str):
            self._ignore(proxy, f"it did not report a {protocol.IDENTITY_PROPERTY!r} property")
            return
        try:
            settings_module.identifier(identity)
        except ValueError as allowed:
            self._ignore(proxy, f"its {protocol.IDENTITY_PROPERTY} {identity[:80]!r} is unusable: {allowed}")
            return
        self._identity_by_cid[proxy.cid] = identity

    def _ignore(self, proxy: ClientProxy, why: str) -> None:
        self._unusable.add(proxy.cid)
        log.warning("ignoring connection %s: %s (logged once per connection)", proxy.cid, why)

    def _refuse(self, proxy: ClientProxy, identity: object, reason: str) -> None:
        """Counted and dropped from the client manager now; told why and closed in the background."""
        self._unusable.add(proxy.cid)
        self.on_refused()
        shown = repr(identity[:80]) if isinstance(identity, str) else "none"
        log.warning("refused connection %s (client-id %s): %s", proxy.cid, shown, reason)
        self.client_manager.unregister(proxy)
        self._send_offs.submit(send_off, proxy, reason)


def send_off(proxy: ClientProxy, reason: str) -> None:
    """Tell a refused client why (a Bouquet client exits naming the setting) and ask it to
    disconnect, then close its stream whatever it did: one that kept the stream open would
    hold a server thread."""
    try:
        proxy.get_properties(GetPropertiesIns(config={protocol.JOIN_REFUSED: reason}), timeout=REFUSAL_TIMEOUT_S, group_id=None)
        proxy.reconnect(ReconnectIns(seconds=None), timeout=REFUSAL_TIMEOUT_S, group_id=None)
    except Exception:  # a client that does not play along is cut off all the same
        pass
    finally:
        bridge = getattr(proxy, "bridge", None)
        if bridge is not None:
            bridge.close()
