"""Conversion between the trainer's Megatron-Core checkpoints and Hugging Face models.

* ``export_checkpoint(load, save)``: a ``dist_checkpointing`` checkpoint saved under any
  TP / EP / PP layout -> a Hugging Face directory (CoE remote code, or stock ``transformers``
  DeepSeek-V2 for a standard MoE that it expresses exactly). CLI: ``tools/convert_to_hf.py``.
* ``import_hf(hf_dir, save, tp=, pp=, ep=, upcycle=)``: a Hugging Face directory -> a trainer
  checkpoint saved from any target layout; ``Upcycle`` turns a standard MoE into CoE-C.
  CLI: ``tools/convert_from_hf.py``.

The architecture of both sides is the one record ``megatron_coe.arch.ModelArch``; ``hf_config.py``
translates it to and from ``config.json``; tensor names and layouts are in
``mapping.py``; the Hugging Face model code that ships with each export is ``hf_template/``.
"""

from megatron_coe.conversion.hf_config import ConversionError  # noqa: F401


def __getattr__(name):  # lazy: keep ``import megatron_coe.conversion`` free of Megatron imports
    if name in ("export_checkpoint", "export_model", "write_hf_model", "ExportResult"):
        from megatron_coe.conversion import export

        return getattr(export, name)
    if name in ("import_hf", "Upcycle", "HFSource", "build_model", "load_checkpoint_into"):
        from megatron_coe.conversion import importer

        return getattr(importer, name)
    if name == "MegatronCheckpoint":
        from megatron_coe.conversion.megatron_ckpt import MegatronCheckpoint

        return MegatronCheckpoint
    raise AttributeError(name)


__all__ = ["ConversionError", "export_checkpoint", "export_model", "write_hf_model",
           "import_hf", "Upcycle", "MegatronCheckpoint"]
