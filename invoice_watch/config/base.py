"""The base of every configuration model (:mod:`~invoice_watch.config.models`,
:mod:`~invoice_watch.config.notifiers`, :mod:`~invoice_watch.config.rules`): frozen,
unknown keys refused, and no error quoting its input (it may be a secret)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)
