"""A fine-tuning script in the shape of diffusers' ``examples/text_to_image/train_text_to_image_lora.py`` and
``train_text_to_image.py --use_ema`` (our own code, the same variable flow: a ``with_transform`` dataset, a
``collate_fn`` batching ``pixel_values`` / ``input_ids``, ``accelerator.accumulate``, checkpoints with
``accelerator.save_state`` on the main process, ``--resume_from_checkpoint latest``), with ``mnemoguard.Guard`` added
exactly as the README's "Plug into an existing diffusers training script" shows (the lines marked ``# guard``).

Run in-process by the tests (``main(argv)``) and by ``accelerate launch`` for the 2-process runs; with ``--record``
each rank writes ``<output_dir>/record<rank>.json`` (weights checksum, the guard's state) for the tests to compare.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import script_common as common  # noqa: E402


def digits_dataset(n: int):
    """sklearn's digits as a ``datasets`` DatasetDict with ``image`` (RGB PIL) and ``text`` columns."""
    import datasets

    from mnemoguard.data import digits_dataset as digits

    rows = digits().select(range(n))
    rows = rows.cast_column("image", datasets.Image()).map(lambda r: {"image": r["image"].convert("RGB")})
    return datasets.DatasetDict({"train": rows.remove_columns("label")})


def main(argv: list[str] | None = None):  # noqa: C901 - the shape of the diffusers scripts
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTokenizer

    from mnemoguard import Guard

    args = common.parse_args(argv, "sd")
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with="tensorboard", project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                                    logging_dir=os.path.join(args.output_dir, "logs")),
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if multi and not torch.cuda.is_available() else [],
    )
    set_seed(args.seed)
    model = args.pretrained_model_name_or_path
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if args.lora:
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    ema_unet = None
    if args.use_ema:
        ema_unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
        ema_unet = EMAModel(ema_unet.parameters(), model_cls=UNet2DConditionModel, model_config=ema_unet.config)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for m in models:
                if args.lora:
                    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(m)))
                    StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=layers,
                                                              safe_serialization=True)
                else:
                    accelerator.unwrap_model(m).save_pretrained(os.path.join(output_dir, "unet"))
                weights.pop()
            if args.use_ema:
                ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def load_model_hook(models, input_dir):
        if args.use_ema:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), UNet2DConditionModel)
            ema_unet.load_state_dict(loaded.state_dict())
            ema_unet.to(accelerator.device)
        while models:
            m = accelerator.unwrap_model(models.pop())
            if args.lora:
                state, _ = StableDiffusionPipeline.lora_state_dict(input_dir)
                state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
                set_peft_model_state_dict(m, convert_unet_state_dict_to_peft(state), adapter_name="default")
            else:
                loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
                m.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)

    dataset = digits_dataset(args.max_train_samples)
    dataset["train"] = dataset["train"].add_column("index", range(len(dataset["train"])))  # guard
    image_column, caption_column = "image", "text"
    resolution = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)

    def tokenize_captions(examples):
        captions = list(examples[caption_column])
        return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids

    def preprocess_train(examples):
        from mnemoguard.data import preprocess_image

        examples["pixel_values"] = [preprocess_image(image, resolution, 3) for image in examples[image_column]]
        examples["input_ids"] = tokenize_captions(examples)
        return examples

    with accelerator.main_process_first():
        train_dataset = dataset["train"].with_transform(preprocess_train)

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples]).float()
        input_ids = torch.stack([example["input_ids"] for example in examples])
        return {"pixel_values": pixel_values, "input_ids": input_ids,
                "captions": [example["text"] for example in examples],  # guard
                "indices": torch.tensor([example["index"] for example in examples])}  # guard

    train_dataloader = torch.utils.data.DataLoader(train_dataset, shuffle=True, collate_fn=collate_fn,
                                                   batch_size=args.train_batch_size,
                                                   generator=torch.Generator().manual_seed(args.seed))
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                          lr_scheduler)
    if args.use_ema:
        ema_unet.to(accelerator.device)
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    if args.guard_after_load_state:  # the mistake the guard must name: built after accelerator.load_state
        global_step, first_epoch, resume_step = common.resume(args, accelerator, num_update_steps_per_epoch)
    guard = Guard(args.guard_config, accelerator=accelerator, model=unet, noise_scheduler=noise_scheduler,  # guard
                  optimizer=optimizer, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                  train_dataset=dataset["train"], ema=ema_unet, max_steps=args.max_train_steps)
    if accelerator.is_main_process:
        accelerator.init_trackers("text2image-fine-tune")
    if not args.guard_after_load_state:
        global_step, first_epoch, resume_step = common.resume(args, accelerator, num_update_steps_per_epoch)

    for epoch in range(first_epoch, num_train_epochs):
        unet.train()
        train_loss = 0.0
        train_dataloader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dataloader, resume_step) if resume_step else train_dataloader
        resume_step = 0
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = guard.sample_timesteps(bsz, latents.device)  # guard
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                target = noise
                inputs = guard.before_forward(timesteps=timesteps, noisy_model_input=noisy_latents,  # guard
                                              encoder_hidden_states=encoder_hidden_states,
                                              captions=batch["captions"], indices=batch["indices"])
                model_pred = unet(inputs["noisy_model_input"], timesteps, inputs["encoder_hidden_states"],
                                  return_dict=False)[0]
                loss = guard.loss(F.mse_loss(model_pred.float(), target.float(), reduction="none"), inputs,  # guard
                                  model_pred=model_pred)
                avg_loss = accelerator.gather(loss.repeat(args.train_batch_size)).mean()
                train_loss += avg_loss.item() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                if args.use_ema:
                    ema_unet.step(unet.parameters())
                global_step += 1
                accelerator.log({"train_loss": train_loss}, step=global_step)
                train_loss = 0.0
                guard.step(global_step)  # guard
                if global_step % args.checkpointing_steps == 0 or guard.should_save:  # guard
                    common.save_checkpoint(args, accelerator, global_step)
            if global_step >= args.max_train_steps or guard.should_stop:  # guard
                break
        if guard.should_stop:  # guard
            break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(unet)
        if args.lora:
            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unwrapped))
            StableDiffusionPipeline.save_lora_weights(args.output_dir, unet_lora_layers=layers,
                                                      safe_serialization=True)
        else:
            if args.use_ema:
                ema_unet.store(unwrapped.parameters())
                ema_unet.copy_to(unwrapped.parameters())
            unwrapped.save_pretrained(os.path.join(args.output_dir, "unet"))
            if args.use_ema:
                ema_unet.restore(unwrapped.parameters())
    if args.end_on_main_process_only:
        if accelerator.is_main_process:
            guard.end(final_dir=args.output_dir, exported="ema" if args.use_ema else "last")
        accelerator.end_training()
        return None
    guard.end(final_dir=args.output_dir, exported="ema" if args.use_ema else "last")  # guard
    weights = {n: p.detach().cpu().clone() for n, p in accelerator.unwrap_model(unet).named_parameters()}
    result = {"global_step": global_step, "rank": accelerator.process_index, "world": accelerator.num_processes,
              "checksum": float(sum(w.double().sum() for w in weights.values())),
              "guard": None if not guard.enabled else {
                  "state_global_step": guard.global_step, "stop_reason": guard.stop_reason,
                  "metrics": guard.metrics, "history": guard.monitor.history if guard.monitor else [],
                  "owns_ema": guard._owns_ema, "ema_type": type(guard.ema).__module__ if guard.ema else None}}
    if args.record:
        Path(args.output_dir, f"record{accelerator.process_index}.json").write_text(json.dumps(result))
    accelerator.end_training()
    return {**result, "weights": weights, "guard_object": guard}


if __name__ == "__main__":
    main()
