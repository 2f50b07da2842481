import logging


def setup_logging() -> None:
    """Give the ``vlmfast`` logger a stderr handler at INFO unless the application configured it."""
    log = logging.getLogger("vlmfast")
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
