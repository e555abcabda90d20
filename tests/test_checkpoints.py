"""One checkpoint format (safetensors + JSON) for every loop; tied and untied heads both survive a resume."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from engine.train import checkpoints


def tiny_lm(tied: bool, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=tied,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: steps are comparable
    return GPT2LMHeadModel(cfg)


def step(model, opt):
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = model(x, labels=x).loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_an_untied_head_survives_a_resume(tmp_path):
    model = tiny_lm(tied=False, seed=0)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step(model, opt)
    checkpoints.save_training_state(tmp_path / "ck", model, opt, {"step": 1})

    again = tiny_lm(tied=False, seed=1)  # other random weights
    opt2 = torch.optim.AdamW(again.parameters(), lr=1e-2)
    meta = checkpoints.load_training_state(tmp_path / "ck", again, opt2)
    assert meta["step"] == 1 and meta["aliases"] == {}
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)  # its own head, not the embedding
    assert not torch.equal(again.lm_head.weight, again.transformer.wte.weight)
    # the optimizer continues exactly: one more step on both gives the same weights
    step(model, opt)
    step(again, opt2)
    assert all(torch.allclose(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_a_tied_head_is_stored_once_and_stays_tied(tmp_path):
    model = tiny_lm(tied=True, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step(model, opt)
    tensors, aliases = checkpoints.model_tensors(model)
    assert aliases == {"lm_head.weight": "transformer.wte.weight"} and "model.lm_head.weight" not in tensors
    checkpoints.save_training_state(tmp_path / "ck", model, opt, {"step": 1})
    again = tiny_lm(tied=True, seed=1)
    checkpoints.load_training_state(tmp_path / "ck", again, torch.optim.AdamW(again.parameters(), lr=1e-2))
    assert torch.equal(again.lm_head.weight, model.transformer.wte.weight)
    assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()


def test_a_checkpoint_for_another_model_is_refused(tmp_path):
    model = tiny_lm(tied=False, seed=0)
    opt = torch.optim.AdamW(model.parameters())
    checkpoints.save_training_state(tmp_path / "ck", model, opt, {})
    other = torch.nn.Linear(3, 3)
    try:
        checkpoints.load_training_state(tmp_path / "ck", other, torch.optim.AdamW(other.parameters()))
    except ValueError as err:
        assert "does not fit" in str(err)
    else:
        raise AssertionError("a checkpoint of another model was loaded")
