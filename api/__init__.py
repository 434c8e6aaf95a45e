"""The faces of Deja: the :class:`Deja` facade, the HTTP app and the CLI."""

from api.deja import Deja
from api.settings import Settings, get_settings

__all__ = ["Deja", "Settings", "get_settings"]
