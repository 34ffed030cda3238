"""Flower's legacy-runtime deprecation banner becomes one line of Bouquet's, once per process."""

from __future__ import annotations

import logging

from flwr.supercore.logger import warn_deprecated_feature

from services import logs


def test_start_client_banner_is_one_line_once_per_process(caplog):
    flower = logging.getLogger("flwr")
    for old in [f for f in flower.filters if isinstance(f, logs.LegacyRuntimeBanner)]:
        flower.removeFilter(old)  # as in a fresh process
    logs.setup()
    bouquet = logging.getLogger("bouquet")
    bouquet.propagate = True  # let caplog see Bouquet's line too
    try:
        with caplog.at_level(logging.INFO):
            for _ in range(3):  # a client that reconnects calls start_client again
                warn_deprecated_feature(name="flwr.client.start_client() is deprecated.\n\tUsing `start_client()` is deprecated.")
            warn_deprecated_feature(name="`clip_by_l2` method")  # other deprecations still show
    finally:
        bouquet.propagate = False
    texts = [record.getMessage() for record in caplog.records]
    assert not any("start_client() is deprecated" in text for text in texts)
    assert texts.count(logs.LEGACY_RUNTIME_NOTE) == 1
    assert any("clip_by_l2" in text for text in texts)
