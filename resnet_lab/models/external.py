"""Models defined outside resnet_lab, trained through the same loop: any timm model by its name
(`model=timm model.name=convnext_atto`) and any nn.Module class by its dotted path, in Hydra's
`_target_` convention (`model=target model._target_=mypkg.nets.MyNet`). Keys added beside them
(`+model.drop_path_rate=0.1`) are the constructor's keyword arguments; num_classes and the input
channels come from the data set, as for resnet_lab's own models.
"""

import importlib
import inspect
from typing import Any, Dict

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from resnet_lab.errors import UserError, closest

OWN_KEYS = ("name", "init", "_target_")  # the config's own, not the constructor's
INSTALL_TIMM = "pip install timm (or pip install 'resnet_lab[timm]')"
# The names a constructor may give its input channels: resnet_lab's and torchvision's, timm's.
CHANNEL_ARGS = ("in_channels", "in_chans")


def kwargs(cfg) -> Dict[str, Any]:
    """The constructor's keyword arguments a model config adds."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in OWN_KEYS}


def _timm():
    try:
        import timm
    except ImportError as e:
        raise UserError(f"model=timm needs the package timm: {INSTALL_TIMM}") from e
    return timm


def check_timm(cfg) -> None:
    if OmegaConf.is_missing(cfg, "name"):
        raise UserError("model=timm: give the timm model, e.g. model.name=resnet50d (timm.list_models() lists them)")
    names = _timm().list_models()
    if cfg.name not in names:
        raise UserError(f"model.name={cfg.name}: not a timm model{closest(cfg.name, names)}; "
                        f"python -c 'import timm; print(timm.list_models())' lists them")


def build_timm(cfg, in_channels: int, num_classes: int) -> nn.Module:
    """timm's model of that name with random weights (model.init gives it a file's)."""
    check_timm(cfg)
    try:
        return _timm().create_model(cfg.name, num_classes=num_classes, in_chans=in_channels, **kwargs(cfg))
    except TypeError as e:
        raise UserError(f"model=timm model.name={cfg.name}: {e}") from e


def locate(path: str) -> type:
    """The class at a dotted path: the longest importable module, then attributes."""
    module_path, attributes = path, []
    while module_path:
        try:
            found = importlib.import_module(module_path)
            break
        except ImportError as e:
            if e.name is not None and not module_path.startswith(e.name):
                raise UserError(f"model._target_={path}: importing {module_path} failed: {e}") from e
            module_path, _, attribute = module_path.rpartition(".")
            attributes.insert(0, attribute)
    else:
        raise UserError(f"model._target_={path}: no module of it can be imported; give the dotted path of an "
                        f"nn.Module class, e.g. mypkg.nets.MyNet, importable where the run starts")
    for attribute in attributes:
        if not hasattr(found, attribute):
            raise UserError(f"model._target_={path}: {found.__name__} has no {attribute}")
        found = getattr(found, attribute)
    return found


def _parameters(cls: type) -> Dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls).parameters)


def check_target(cfg) -> type:
    """The class (or function) at model._target_, once it is known to take num_classes."""
    if OmegaConf.is_missing(cfg, "_target_"):
        raise UserError("model=target: give the class, e.g. model._target_=mypkg.nets.MyNet")
    cls = locate(cfg._target_)
    if not callable(cls) or (isinstance(cls, type) and not issubclass(cls, nn.Module)):
        raise UserError(f"model._target_={cfg._target_}: not an nn.Module class (nor a function that builds one)")
    params = _parameters(cls)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "num_classes" not in params and not takes_any:
        raise UserError(f"model._target_={cfg._target_}: {cls.__name__} does not take num_classes; its "
                        f"constructor must take the class count (the data set's) as num_classes")
    return cls


def build_target(cfg, in_channels: int, num_classes: int) -> nn.Module:
    """The class at model._target_ (or what the function there returns), given num_classes and,
    where its constructor names them in_channels or in_chans, the input channels."""
    params = _parameters(check_target(cfg))
    name = next((n for n in CHANNEL_ARGS if n in params), None)
    channels = {name: in_channels} if name else {}
    node = OmegaConf.create({"_target_": cfg._target_, **kwargs(cfg)})
    try:
        model = instantiate(node, num_classes=num_classes, **channels)
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise UserError(f"model._target_={cfg._target_}: {type(cause).__name__}: {str(cause).splitlines()[0]}") from e
    if not isinstance(model, nn.Module) or not any(True for _ in model.parameters()):
        raise UserError(f"model._target_={cfg._target_}: built a {type(model).__name__}, not an nn.Module "
                        f"with parameters to train")
    return model
