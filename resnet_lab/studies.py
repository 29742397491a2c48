"""Where a study lives: an Optuna storage opened from the one string the user gives
(hydra.sweeper.storage) and every trial's run is handed (search.storage).

No URL scheme: a journal file (Optuna's JournalStorage), the default being optuna.journal in
the sweep folder; redis://: a journal in Redis; any other URL: a database (RDBStorage, through
SQLAlchemy: postgresql://, mysql://, sqlite:///). docs/search.md says which to choose.
"""

import time
from pathlib import Path

from resnet_lab.errors import UserError

JOURNAL = "optuna.journal"


def default_url(sweep_dir: Path) -> str:
    return str(Path(sweep_dir).resolve() / JOURNAL)


def _database(url: str):
    """RDBStorage, which makes its tables in an empty database: workers started at once on a new
    database race to make them, and all but one fail on a duplicate; those find the tables made."""
    import optuna
    import sqlalchemy.exc

    for attempt in range(ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except sqlalchemy.exc.IntegrityError:
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


ATTEMPTS = 4


def open_storage(url: str):
    """The storage at url, or a UserError naming it and why Optuna could not open it."""
    from optuna.storages import journal

    try:
        if "://" not in url:
            # The open() lock works on NFS too, where symlinks may not be atomic.
            return journal.JournalStorage(journal.JournalFileBackend(url, journal.JournalFileOpenLock(url)))
        if url.startswith(("redis://", "rediss://", "unix://")):
            return journal.JournalStorage(journal.JournalRedisBackend(url))
        return _database(url)
    except Exception as e:  # noqa: BLE001 (SQLAlchemy, drivers, the file system: each its own type)
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"hydra.sweeper.storage={url}: Optuna cannot open it: {first}") from e
