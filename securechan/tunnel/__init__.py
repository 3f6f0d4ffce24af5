"""The tunnel: wrap any TCP or Unix-socket service with securechan, stunnel/ghostunnel style.

``securechan server`` accepts securechan and relays plain TCP to a target; ``securechan
client`` accepts plain TCP and relays it over securechan; ``securechan run`` runs the
tunnels of a TOML file. :class:`Tunnel` is the same thing as a library object.
"""

from .addresses import Address, parse_address
from .relay import Relay
from .runner import serve
from .service import Tunnel
from .spec import TunnelSpec

__all__ = ["Address", "Relay", "Tunnel", "TunnelSpec", "parse_address", "serve"]
