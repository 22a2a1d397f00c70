"""Conveyor's web console: queues, tasks, dead letters, schedules, workers and admin pages
in a browser, served by the package itself (``conveyor console``, and ``conveyor dev``).

The console is a client of the public gRPC API like any other: each person signs in with
their own API key, and every page is read with it, so what they see and may do is exactly
what their key's tenant and scopes allow there. The key stays on the server; the browser
holds a random session id. Pages are rendered on the server (Jinja2, autoescaped) and
served by aiohttp; live views are server-sent events carrying HTML fragments, which the
vendored htmx swaps in (nothing is loaded from another site).

Modules: ``server`` (:class:`Console`, :class:`ConsoleConfig`), ``web`` (what every
request shares: sessions, rendering, CSRF, errors), ``auth`` (sign-in and out),
``pages`` and ``admin`` (the pages), ``live`` (the event streams), ``sessions`` and
``present`` (pure logic), ``templates/`` and ``static/``.
"""

from conveyor.console.server import DEFAULT_LISTEN, Console, ConsoleConfig
from conveyor.console.sessions import SessionPolicy

__all__ = ["DEFAULT_LISTEN", "Console", "ConsoleConfig", "SessionPolicy"]
