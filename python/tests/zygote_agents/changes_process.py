"""A preloaded module that changes what an agent must not inherit from the zygote: a signal
handler, an ignored and a blocked signal, a wakeup fd, the collector, open files, and random's
state (drawn from at import)."""

import gc
import random
import signal
import socket


def _on_term(signum: int, frame: object) -> None:
    pass


signal.signal(signal.SIGTERM, _on_term)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
WAKEUP = socket.socketpair()
WAKEUP[1].setblocking(False)
signal.set_wakeup_fd(WAKEUP[1].fileno())
gc.disable()
gc.set_threshold(5000, 50, 50)
FILE = open(__file__, "rb")
DRAWN = random.random()
