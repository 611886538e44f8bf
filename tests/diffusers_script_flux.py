"""A LoRA fine-tuning script in the shape of diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` with
per-image captions (our own code, its variable flow: CLIP + T5 ``encode_prompt`` giving ``prompt_embeds``,
``pooled_prompt_embeds`` and ``text_ids``, latents shifted and scaled, ``compute_density_for_timestep_sampling``
timesteps, ``get_sigmas``, ``(1 − σ)·x0 + σ·noise``, latents packed into 2x2 patches with their ``img_ids``, the
guidance embedding, ``timestep / 1000``, the prediction unpacked, target ``noise − model_input``), with
``mnemoguard.Guard`` added exactly as the README's Flux lines show (marked ``# guard``). Run in-process by the tests
(``main(argv)``) and by ``accelerate launch`` for the 2-process runs."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import script_common as common  # noqa: E402


def encode_prompt(text_encoders, tokenizers, prompt, max_sequence_length):
    """CLIP's pooled output and T5's states, with T5's text ids (diffusers' Flux ``encode_prompt``)."""
    prompt = [prompt] if isinstance(prompt, str) else prompt
    clip_ids = tokenizers[0](prompt, padding="max_length", max_length=tokenizers[0].model_max_length,
                             truncation=True, return_tensors="pt").input_ids
    pooled_prompt_embeds = text_encoders[0](clip_ids.to(text_encoders[0].device), output_hidden_states=False)
    pooled_prompt_embeds = pooled_prompt_embeds.pooler_output
    t5_ids = tokenizers[1](prompt, padding="max_length", max_length=max_sequence_length, truncation=True,
                           return_tensors="pt").input_ids
    prompt_embeds = text_encoders[1](t5_ids.to(text_encoders[1].device), output_hidden_states=False)[0]
    text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=prompt_embeds.device, dtype=prompt_embeds.dtype)
    return prompt_embeds, pooled_prompt_embeds, text_ids


def main(argv: list[str] | None = None):  # noqa: C901 - the shape of the diffusers script
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3
    from peft import LoraConfig
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    from mnemoguard import Guard
    from mnemoguard.family import FluxAdapter

    args = common.parse_args(argv, "flux")
    accelerator = common.make_accelerator(args)
    model = args.pretrained_model_name_or_path
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    noise_scheduler_copy = copy.deepcopy(noise_scheduler)
    tokenizers = [AutoTokenizer.from_pretrained(model, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    text_encoders = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
                     T5EncoderModel.from_pretrained(model, subfolder="text_encoder_2")]
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
    for m in (vae, transformer, *text_encoders):
        m.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    common.lora_hooks(accelerator, FluxPipeline, "transformer")
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    vae_config_shift_factor, vae_config_scaling_factor = vae.config.shift_factor, vae.config.scaling_factor
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def compute_text_embeddings(prompt, text_encoders, tokenizers):
        with torch.no_grad():
            prompt_embeds, pooled_prompt_embeds, text_ids = encode_prompt(text_encoders, tokenizers, prompt,
                                                                          args.max_sequence_length)
        return prompt_embeds.to(accelerator.device), pooled_prompt_embeds.to(accelerator.device), text_ids

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

    guard = Guard(args.guard_config, accelerator=accelerator,  # guard
                  model=FluxAdapter(transformer, guidance_scale=args.guidance_scale),
                  noise_scheduler=noise_scheduler_copy, optimizer=optimizer,
                  encode_prompt=lambda captions: compute_text_embeddings(captions, text_encoders, tokenizers),
                  tokenizer=tokenizers[0], vae=vae, train_dataset=dataset["train"], resolution=args.resolution,
                  weighting_scheme=args.weighting_scheme, logit_mean=args.logit_mean, logit_std=args.logit_std,
                  mode_scale=args.mode_scale, max_steps=args.max_train_steps)
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-flux-dev-lora")
    global_step, first_epoch, resume_step = common.resume(args, accelerator, num_update_steps_per_epoch)

    get_sigmas = common.sigmas_of(noise_scheduler_copy, accelerator.device)

    for epoch in range(first_epoch, num_train_epochs):
        transformer.train()
        train_dataloader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dataloader, resume_step) if resume_step else train_dataloader
        resume_step = 0
        for batch in loader:
            with accelerator.accumulate([transformer]):
                prompt_embeds, pooled_prompt_embeds, text_ids = compute_text_embeddings(batch["prompts"],
                                                                                        text_encoders, tokenizers)
                model_input = vae.encode(batch["pixel_values"]).latent_dist.sample()
                model_input = (model_input - vae_config_shift_factor) * vae_config_scaling_factor
                latent_image_ids = FluxPipeline._prepare_latent_image_ids(
                    model_input.shape[0], model_input.shape[2] // 2, model_input.shape[3] // 2, accelerator.device,
                    model_input.dtype)
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                timesteps = guard.sample_timesteps(bsz, model_input.device)  # guard
                sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
                noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
                inputs = guard.before_forward(timesteps=timesteps, noisy_model_input=noisy_model_input,  # guard
                                              encoder_hidden_states=prompt_embeds,
                                              pooled_projections=pooled_prompt_embeds,
                                              captions=batch["captions"], indices=batch["indices"])
                packed_noisy_model_input = FluxPipeline._pack_latents(
                    noisy_model_input, batch_size=model_input.shape[0], num_channels_latents=model_input.shape[1],
                    height=model_input.shape[2], width=model_input.shape[3])
                guidance = None
                if accelerator.unwrap_model(transformer).config.guidance_embeds:
                    guidance = torch.tensor([args.guidance_scale], device=accelerator.device)
                    guidance = guidance.expand(model_input.shape[0])
                model_pred = transformer(hidden_states=packed_noisy_model_input, timestep=timesteps / 1000,
                                         guidance=guidance, pooled_projections=inputs["pooled_projections"],
                                         encoder_hidden_states=inputs["encoder_hidden_states"], txt_ids=text_ids,
                                         img_ids=latent_image_ids, return_dict=False)[0]
                model_pred = FluxPipeline._unpack_latents(model_pred, height=model_input.shape[2] * vae_scale_factor,
                                                          width=model_input.shape[3] * vae_scale_factor,
                                                          vae_scale_factor=vae_scale_factor)
                weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
                target = noise - model_input
                loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(
                    target.shape[0], -1), 1)
                loss = guard.loss(loss, inputs, model_pred=model_pred)  # guard
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
        FluxPipeline.save_lora_weights(args.output_dir, transformer_lora_layers=transformer_lora_layers)
    guard.end(final_dir=args.output_dir)  # guard
    return common.record(args, accelerator, transformer, global_step, guard)


if __name__ == "__main__":
    main()
