"""A module that starts a thread when imported, as some libraries do (a preload to refuse)."""

import threading
import time

threading.Thread(target=time.sleep, args=(60,), name="sleeper-at-import", daemon=True).start()
