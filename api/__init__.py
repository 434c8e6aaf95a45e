"""The faces of Deja: the :class:`Deja` facade, the HTTP app and the CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from api.settings import Settings, get_settings

if TYPE_CHECKING:
    from api.deja import Deja

__all__ = ["Deja", "Settings", "get_settings"]


def __getattr__(name: str) -> Any:
    # The facade pulls in torch and the model stack; the CLI's fast paths should not pay for it.
    if name == "Deja":
        from api.deja import Deja

        return Deja
    raise AttributeError(name)
