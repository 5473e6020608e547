"""The MLflow model of a registered dist-prune version, as MLflow's "models from code" file.

MLflow copies this file into every registered model and runs it when the model is loaded
(`mlflow.pyfunc.load_model("models:/NAME@ALIAS")`, `mlflow models serve`): nothing is unpickled,
and a dense export needs nothing of dist-prune where it is served. dist-prune never imports it
(dist_prune/registry/pyfunc.py names it by path).

Text in, generated text out: a column "prompt" of strings (MLflow makes any input a DataFrame by
the signature), answered by a list of strings, each prompt's continuation, greedy; the param
max_new_tokens (default 32) bounds it. The model is the export's Hugging Face directory, the artifact "export", loaded with
safetensors only and no remote code. A compressed export (export.format sparse-*) holds no
loadable model by design; it is decompressed first, which needs dist-prune installed.
"""

import os
import tempfile

import mlflow
import pandas
from mlflow.pyfunc import PythonModel

ARTIFACT = "export"
MAX_NEW_TOKENS = 32


class PrunedCausalLM(PythonModel):
    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = context.artifacts[ARTIFACT]
        if not os.path.isfile(os.path.join(directory, "config.json")):  # a compressed export
            directory = self._decompressed(directory)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, trust_remote_code=False)
        self.model.eval()
        self.no_grad = torch.no_grad

    def _decompressed(self, directory):
        try:
            from dist_prune.io.decompress import decompress_export
        except ImportError:
            raise RuntimeError(f"{directory} is a compressed dist-prune export: serving it needs dist-prune "
                               "installed (or `dist-prune pull` it, which gives the dense model)") from None
        self._scratch = tempfile.TemporaryDirectory(prefix="dist-prune-served-")  # removed with the model
        return str(decompress_export(directory, os.path.join(self._scratch.name, "dense")))

    # the DataFrame hint: MLflow then takes the signature as given and validates by it
    def predict(self, context, model_input: pandas.DataFrame, params=None) -> list[str]:
        prompts = [str(p) for p in model_input["prompt"]]
        max_new_tokens = int((params or {}).get("max_new_tokens", MAX_NEW_TOKENS))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        answers = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt")
            with self.no_grad():
                out = self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            answers.append(self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        return answers


mlflow.models.set_model(PrunedCausalLM())
