"""lvd's packaged configs (`default.yaml`, `demo.yaml`, `lvd142m.yaml`, `pretrain.yaml`, ...), installed
as package data so that `lvd run demo` finds them anywhere; `lvd.common.config.packaged_config_path` reads them."""
