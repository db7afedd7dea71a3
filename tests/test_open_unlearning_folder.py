"""``integrations/open_unlearning``: installs into a stand-in OpenUnlearning checkout, its YAML
composes with Hydra, and the registered trainers build and train on this project's test methods.

The stand-in checkout has OpenUnlearning's layout (``src/trainer/__init__.py`` with a
``_register_trainer`` registry, ``configs/unlearn.yaml`` and the config groups the CLReg files
name), its base methods being ``tests/dist_scripts/hf_testing.py``'s GradDiff- and NPO-like
trainers with OpenUnlearning's constructor arguments.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
hydra = pytest.importorskip("hydra")
pytest.importorskip("omegaconf")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(ROOT, "integrations", "open_unlearning")
SCRIPTS = os.path.join(ROOT, "tests", "dist_scripts")

STAND_IN = {
    # the registry, as OpenUnlearning's src/trainer/__init__.py keeps it
    "src/trainer/__init__.py": """
        from trainer.unlearn.grad_diff import GradDiff
        from trainer.unlearn.npo import NPO
        from trainer.unlearn.simnpo import SimNPO

        TRAINER_REGISTRY = {}


        def _register_trainer(trainer_class):
            TRAINER_REGISTRY[trainer_class.__name__] = trainer_class


        _register_trainer(GradDiff)
        _register_trainer(NPO)
        _register_trainer(SimNPO)
        """,
    "src/trainer/unlearn/__init__.py": "",
    # OpenUnlearning's constructors take their method arguments plus evaluators/template_args
    "src/trainer/unlearn/grad_diff.py": """
        import hf_testing as H


        class GradDiff(H.GradDiffLike):
            def __init__(self, gamma=1.0, alpha=1.0, retain_loss_type="NLL", *args,
                         evaluators=None, template_args=None, **kwargs):
                super().__init__(*args, gamma=gamma, alpha=alpha, **kwargs)
        """,
    "src/trainer/unlearn/npo.py": """
        import hf_testing as H


        class NPO(H.NPOLike):
            def __init__(self, beta=0.1, gamma=1.0, alpha=1.0, retain_loss_type="NLL", *args,
                         evaluators=None, template_args=None, **kwargs):
                super().__init__(*args, beta=beta, alpha=alpha, **kwargs)
        """,
    "src/trainer/unlearn/simnpo.py": """
        from trainer.unlearn.npo import NPO


        class SimNPO(NPO):
            def __init__(self, delta=0.0, beta=4.5, *args, **kwargs):
                super().__init__(beta, *args, **kwargs)
        """,
    "configs/unlearn.yaml": """
        defaults:
          - model: tiny
          - trainer: GradAscent
          - data: unlearn
          - collator: DataCollatorForSupervisedDataset
          - experiment: null
          - _self_

        trainer:
          args:
            remove_unused_columns: False
        mode: unlearn
        task_name: ???
        """,
    "configs/model/tiny.yaml": "model_args: {}\n",
    "configs/data/unlearn.yaml": "anchor: forget\n",
    "configs/collator/DataCollatorForSupervisedDataset.yaml":
        "DataCollatorForSupervisedDataset:\n  args: {}\n",
    "configs/collator/DataCollatorForSupervisedDatasetwithIndex.yaml": """
        defaults:
          - DataCollatorForSupervisedDataset

        DataCollatorForSupervisedDataset:
          args:
            index: index
        """,
    "configs/trainer/finetune.yaml": """
        handler: FinetuneTrainer
        args:
          per_device_train_batch_size: 4
          gradient_accumulation_steps: 1
          learning_rate: 1e-5
          output_dir: ${task_name}
          ddp_find_unused_parameters: None
          save_strategy: 'no'
          seed: 0
        """,
    "configs/trainer/GradAscent.yaml": "defaults:\n  - finetune\n\nhandler: GradAscent\n",
    "configs/trainer/GradDiff.yaml": """
        defaults:
          - finetune

        handler: GradDiff
        method_args:
          gamma: 1.0
          alpha: 1.0
          retain_loss_type: NLL
        """,
    "configs/trainer/NPO.yaml": """
        defaults:
          - GradDiff

        handler: NPO
        method_args:
          beta: 0.1
          alpha: 1.0
          gamma: 1.0
          retain_loss_type: NLL
        """,
    "configs/trainer/SimNPO.yaml": """
        defaults:
          - GradDiff

        handler: SimNPO
        method_args:
          delta: 0.0
          beta: 4.5
          alpha: 1.0
          gamma: 0.125
          retain_loss_type: NLL
        """,
    "configs/experiment/unlearn/tofu/default.yaml": """
        # @package _global_

        defaults:
          - override /trainer: GradAscent

        trainer:
          args:
            learning_rate: 1e-5
            weight_decay: 0.01
        task_name: ???
        """,
}


@pytest.fixture()
def checkout(tmp_path):
    root = tmp_path / "open-unlearning"
    for rel, text in STAND_IN.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root


@pytest.fixture()
def trainer_package(checkout):
    """The checkout's ``trainer`` package importable, then forgotten again."""
    paths = [str(checkout / "src"), SCRIPTS]
    sys.path[:0] = paths
    yield
    for path in paths:
        sys.path.remove(path)
    for name in [m for m in sys.modules if m == "trainer" or m.startswith("trainer.")]:
        del sys.modules[name]


def _run_install(checkout, *flags):
    return subprocess.run([sys.executable, os.path.join(FOLDER, "install.py"), str(checkout),
                           *flags], capture_output=True, text=True, timeout=120)


def _install(checkout, *flags):
    proc = _run_install(checkout, *flags)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def _compose(checkout, overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(checkout / "configs"), version_base=None):
        return compose(config_name="unlearn.yaml", overrides=overrides)


def test_install_copies_the_folder_and_registers_once(checkout):
    written = _install(checkout)
    for rel in ("src/trainer/unlearn/clreg.py", "configs/trainer/CLRegNPO.yaml",
                "configs/trainer/CLRegGradDiff.yaml", "configs/trainer/CLRegSimNPO.yaml",
                "configs/experiment/unlearn/tofu/clreg.yaml",
                "community/methods/CLReg/README.md", "community/methods/CLReg/run.sh"):
        assert (checkout / rel).is_file(), rel
        assert str(checkout / rel) in written
    registry = (checkout / "src/trainer/__init__.py").read_text()
    assert _install(checkout) == []  # again: nothing to write, the registration not repeated
    assert (checkout / "src/trainer/__init__.py").read_text() == registry
    assert registry.count("_register_trainer(CLRegNPO)") == 1


def test_install_never_overwrites_an_edited_file_silently(checkout):
    _install(checkout)
    edited = checkout / "configs/trainer/CLRegNPO.yaml"
    edited.write_text(edited.read_text().replace("clreg_weight: 1.0", "clreg_weight: 0.3"))
    (checkout / "community/methods/CLReg/run.sh").unlink()
    refused = _run_install(checkout)
    assert refused.returncode != 0 and str(edited) in refused.stderr and "--force" in refused.stderr
    assert "clreg_weight: 0.3" in edited.read_text()
    assert not (checkout / "community/methods/CLReg/run.sh").exists()  # nothing was written
    assert sorted(_install(checkout, "--force")) == sorted(
        [str(edited), str(checkout / "community/methods/CLReg/run.sh")])
    assert edited.read_text() == open(os.path.join(FOLDER, "configs/trainer/CLRegNPO.yaml")).read()


def test_install_refuses_a_folder_that_is_not_an_open_unlearning_checkout(checkout):
    bad = _run_install(checkout / "configs")
    assert bad.returncode != 0 and "OpenUnlearning checkout" in bad.stderr
    assert not (checkout / "configs/src").exists()  # nothing copied there


@pytest.mark.parametrize("method, base_arg", [("CLRegGradDiff", "gamma"), ("CLRegNPO", "beta"),
                                              ("CLRegSimNPO", "delta")])
def test_trainer_configs_compose_and_build(method, base_arg, checkout, trainer_package,
                                           tmp_path):
    import hf_testing as H

    _install(checkout)
    cfg = _compose(checkout, [f"trainer={method}", "task_name=t",
                              "trainer.method_args.clreg_weight=0.5"])
    assert cfg.trainer.handler == method
    method_args = dict(cfg.trainer.method_args)
    assert base_arg in method_args and method_args["clreg_weight"] == 0.5
    assert method_args["clreg_proj_dim"] == 256 and method_args["clreg_rows_per_concept"] is None

    import trainer as ou

    cls = ou.TRAINER_REGISTRY[cfg.trainer.handler]
    args = H.training_args(tmp_path / method, per_device_train_batch_size=4)
    built = cls(model=H.tiny_model(), args=args, train_dataset=H.make_pairs(4),
                data_collator=H.collate_pairs, evaluators=None, template_args=None,
                **method_args)
    assert built.clreg_weight == 0.5 and built.clreg_head.out_features == 256
    assert getattr(built, base_arg, None) is not None or base_arg == "delta"


def test_the_tofu_experiment_composes_and_its_concepts_come_from_the_index(
        checkout, trainer_package, tmp_path):
    import hf_testing as H

    _install(checkout)
    cfg = _compose(checkout, ["experiment=unlearn/tofu/clreg.yaml", "task_name=t"])
    assert cfg.trainer.handler == "CLRegNPO"
    assert cfg.collator.DataCollatorForSupervisedDataset.args.index == "index"
    assert cfg.trainer.method_args.clreg_rows_per_concept == 20
    assert cfg.trainer.args.weight_decay == 0.01  # OpenUnlearning's experiment still applies

    import trainer as ou

    seen = []

    class Recording(ou.TRAINER_REGISTRY["CLRegNPO"]):
        def clreg_concept_ids(self, forget):
            seen.append(super().clreg_concept_ids(forget))
            return seen[-1]

    def collate_with_index(items):
        batch = H.collate_pairs(items)
        batch["forget"].pop("concept_ids")
        batch["forget"]["index"] = torch.tensor([0, 19, 20, 45])  # authors 0, 0, 1, 2
        return batch

    method_args = {**cfg.trainer.method_args, "clreg_proj_dim": 8}
    trained = Recording(model=H.tiny_model(), args=H.training_args(tmp_path / "tofu"),
                        train_dataset=H.make_pairs(4), data_collator=collate_with_index,
                        **method_args)
    trained.train()
    assert torch.equal(seen[0], torch.tensor([0, 0, 1, 2]))
    assert any("clreg_loss" in e for e in trained.state.log_history)
    with pytest.raises(ValueError, match="clreg_rows_per_concept"):
        Recording(model=H.tiny_model(), args=H.training_args(tmp_path / "bad"),
                  train_dataset=H.make_pairs(4), data_collator=collate_with_index,
                  **{**method_args, "clreg_rows_per_concept": 0})
