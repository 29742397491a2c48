"""resnet_lab's Optuna search as a Hydra sweeper: `hparams_search=optuna` selects it
(hydra/sweeper=resnet_lab_optuna). Hydra imports this module at every start, so Optuna is
imported only once a search begins (resnet_lab.sweeps.search)."""

from typing import List

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.plugins.sweeper import Sweeper

from resnet_lab.sweeps.options import register


class ResnetLabOptunaSweeper(Sweeper):
    """Hydra's plugin class (it must live in hydra_plugins); the search is OptunaSearch."""

    def __init__(self, **settings) -> None:
        from resnet_lab.sweeps.search import OptunaSearch

        self.search = OptunaSearch(**settings)

    def setup(self, **context) -> None:
        self.search.setup(**context)

    def sweep(self, arguments: List[str]) -> None:
        self.search.sweep(arguments)


class SearchConfigs(SearchPathPlugin):
    """Stores the search's configs again once Hydra has imported every plugin, before it composes
    a config: hydra-optuna-sweeper (Optuna 2), while still installed, stores samplers of the same
    names in the same group, and the plugin Hydra imports last would win."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        register()


register()
