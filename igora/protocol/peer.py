"""One agent of the room as seen through its awareness state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .names import PROTOCOL_VERSION, AgentField, AgentType, number


@dataclass(frozen=True)
class Peer:
    """One agent as seen through awareness."""

    client_id: int
    state: dict[str, Any]

    @property
    def id(self) -> str | None:
        v = self.state.get(AgentField.ID)
        return v if isinstance(v, str) else None

    @property
    def type(self) -> str | None:
        return self.state.get(AgentField.TYPE)

    @property
    def name(self) -> str:
        return str(self.state.get(AgentField.NAME) or self.id or self.client_id)

    @property
    def date(self) -> float:
        return number(self.state.get(AgentField.DATE)) or 0.0

    @property
    def models(self) -> list[str]:
        raw = self.state.get(AgentField.MODELS)
        if not isinstance(raw, list):
            return []
        names = []
        for m in raw:
            if isinstance(m, dict) and isinstance(m.get("name"), str):
                names.append(m["name"])
            elif isinstance(m, str):
                names.append(m)
        return names

    @property
    def slots(self) -> int:
        s = self.state.get(AgentField.SLOTS)
        if isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 1024:
            return s
        return 1  # an original worker runs one task at a time

    @property
    def igora(self) -> bool:
        return self.state.get(AgentField.PROTOCOL) == PROTOCOL_VERSION

    def serves(self, model: str | None) -> bool:
        """Whether this worker can run a task asking for ``model`` (None: any)."""
        if self.type != AgentType.WORKER.value:
            return False
        if not model:
            return True
        models = self.models
        # An original worker advertises no models: it takes only tasks naming none.
        return model in models
