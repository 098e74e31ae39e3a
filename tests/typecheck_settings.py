"""Settings for mypy's Django plugin, which imports them: the app's own, with a placeholder key.

apps.settings refuses to load without SECRET_KEY (unless DEBUG); the type checker needs
the names and their types, never the key itself.
"""

import os

os.environ.setdefault("SECRET_KEY", "graft-typecheck-only-never-a-deployment-key-0123456789")

from apps.settings import *  # noqa: E402,F403
