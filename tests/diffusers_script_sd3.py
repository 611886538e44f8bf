"""A LoRA fine-tuning script in the shape of diffusers' ``examples/dreambooth/train_dreambooth_lora_sd3.py`` with
per-image captions (our own code, its variable flow: three tokenizers and text encoders, ``encode_prompt`` giving
``prompt_embeds`` and ``pooled_prompt_embeds``, a copy of the ``FlowMatchEulerDiscreteScheduler``, timesteps from
``compute_density_for_timestep_sampling``, ``get_sigmas``, ``(1 − σ)·x0 + σ·noise``, ``--precondition_outputs``,
``compute_loss_weighting_for_sd3``), with ``mnemoguard.Guard`` added exactly as the README's SD3 lines show (marked
``# guard``). Run in-process by the tests (``main(argv)``) and by ``accelerate launch`` for the 2-process runs."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import script_common as common  # noqa: E402


def _tokens(tokenizer, prompt, max_length):
    return tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompt(text_encoders, tokenizers, prompt, max_sequence_length):
    """CLIP-L and CLIP-G penultimate states (zero-padded to T5's width) followed by T5's states, and both CLIPs'
    pooled outputs, concatenated (diffusers' SD3 ``encode_prompt``)."""
    prompt = [prompt] if isinstance(prompt, str) else prompt
    clip_embeds, clip_pooled = [], []
    for tokenizer, text_encoder in zip(tokenizers[:2], text_encoders[:2]):
        out = text_encoder(_tokens(tokenizer, prompt, 16).to(text_encoder.device), output_hidden_states=True)
        clip_pooled.append(out[0])
        clip_embeds.append(out.hidden_states[-2])
    clip_prompt_embeds = torch.cat(clip_embeds, dim=-1)
    pooled_prompt_embeds = torch.cat(clip_pooled, dim=-1)
    t5 = text_encoders[2](_tokens(tokenizers[2], prompt, max_sequence_length).to(text_encoders[2].device))[0]
    clip_prompt_embeds = torch.nn.functional.pad(clip_prompt_embeds, (0, t5.shape[-1] - clip_prompt_embeds.shape[-1]))
    prompt_embeds = torch.cat([clip_prompt_embeds, t5], dim=-2)
    return prompt_embeds, pooled_prompt_embeds


def main(argv: list[str] | None = None):  # noqa: C901 - the shape of the diffusers script
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3
    from peft import LoraConfig
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    from mnemoguard import Guard

    args = common.parse_args(argv, "sd3")
    accelerator = common.make_accelerator(args)
    model = args.pretrained_model_name_or_path
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    noise_scheduler_copy = copy.deepcopy(noise_scheduler)
    tokenizers = [AutoTokenizer.from_pretrained(model, subfolder=s) for s in ("tokenizer", "tokenizer_2",
                                                                               "tokenizer_3")]
    text_encoders = [CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder"),
                     CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2"),
                     T5EncoderModel.from_pretrained(model, subfolder="text_encoder_3")]
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    transformer = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer")
    for m in (vae, transformer, *text_encoders):
        m.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    common.lora_hooks(accelerator, StableDiffusion3Pipeline, "transformer")
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)

    def compute_text_embeddings(prompt, text_encoders, tokenizers):
        with torch.no_grad():
            prompt_embeds, pooled_prompt_embeds = encode_prompt(text_encoders, tokenizers, prompt,
                                                                args.max_sequence_length)
        return prompt_embeds.to(accelerator.device), pooled_prompt_embeds.to(accelerator.device)

    dataset = common.digits_dataset(args.max_train_samples, args.resolution)
    dataset["train"] = dataset["train"].add_column("index", range(len(dataset["train"])))  # guard
    train_dataset = dataset["train"].with_transform(common.pixel_transform(args.resolution))

    def collate_fn(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).float(),
                "prompts": [e["text"] for e in examples],
                "captions": [example["text"] for example in examples],  # guard
                "indices": torch.tensor([example["index"] for example in examples])}  # guard

    train_dataloader = torch.utils.data.DataLoader(train_dataset, shuffle=True, collate_fn=collate_fn,
                                                   batch_size=args.train_batch_size,
                                                   generator=torch.Generator().manual_seed(args.seed))
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    transformer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(transformer, optimizer,
                                                                                 train_dataloader, lr_scheduler)
    num_update_steps_per_epoch, num_train_epochs = common.epochs(args, train_dataloader)

    guard = Guard(args.guard_config, accelerator=accelerator, model=transformer,  # guard
                  noise_scheduler=noise_scheduler_copy, optimizer=optimizer,
                  encode_prompt=lambda captions: compute_text_embeddings(captions, text_encoders, tokenizers),
                  tokenizer=tokenizers[0], vae=vae, train_dataset=dataset["train"], resolution=args.resolution,
                  weighting_scheme=args.weighting_scheme, logit_mean=args.logit_mean, logit_std=args.logit_std,
                  mode_scale=args.mode_scale, max_steps=args.max_train_steps)
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-sd3-lora")
    global_step, first_epoch, resume_step = common.resume(args, accelerator, num_update_steps_per_epoch)

    get_sigmas = common.sigmas_of(noise_scheduler_copy, accelerator.device)

    for epoch in range(first_epoch, num_train_epochs):
        transformer.train()
        train_dataloader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dataloader, resume_step) if resume_step else train_dataloader
        resume_step = 0
        for batch in loader:
            with accelerator.accumulate([transformer]):
                prompt_embeds, pooled_prompt_embeds = compute_text_embeddings(batch["prompts"], text_encoders,
                                                                              tokenizers)
                model_input = vae.encode(batch["pixel_values"]).latent_dist.sample()
                model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                timesteps = guard.sample_timesteps(bsz, model_input.device)  # guard
                sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
                noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
                inputs = guard.before_forward(timesteps=timesteps, noisy_model_input=noisy_model_input,  # guard
                                              encoder_hidden_states=prompt_embeds,
                                              pooled_projections=pooled_prompt_embeds,
                                              captions=batch["captions"], indices=batch["indices"])
                model_pred = transformer(hidden_states=noisy_model_input, timestep=timesteps,
                                         encoder_hidden_states=inputs["encoder_hidden_states"],
                                         pooled_projections=inputs["pooled_projections"], return_dict=False)[0]
                if args.precondition_outputs:
                    model_pred = model_pred * (-sigmas) + noisy_model_input
                weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
                target = model_input if args.precondition_outputs else noise - model_input
                loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(
                    target.shape[0], -1), 1)
                loss = guard.loss(loss, inputs, model_pred=model_pred,  # guard
                                  prediction_type="sample" if args.precondition_outputs else None)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                global_step += 1
                guard.step(global_step)  # guard
                if global_step % args.checkpointing_steps == 0 or guard.should_save:  # guard
                    common.save_checkpoint(args, accelerator, global_step)
            if global_step >= args.max_train_steps or guard.should_stop:  # guard
                break
        if guard.should_stop:  # guard
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from peft.utils import get_peft_model_state_dict

        transformer_lora_layers = get_peft_model_state_dict(accelerator.unwrap_model(transformer))
        StableDiffusion3Pipeline.save_lora_weights(args.output_dir, transformer_lora_layers=transformer_lora_layers)
    guard.end(final_dir=args.output_dir)  # guard
    return common.record(args, accelerator, transformer, global_step, guard)


if __name__ == "__main__":
    main()
