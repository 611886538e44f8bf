"""A LoRA fine-tuning script in the shape of diffusers' ``examples/text_to_image/train_text_to_image_lora_sdxl.py``
(our own code, its variable flow: two tokenizers and text encoders, ``compute_time_ids`` from ``original_sizes`` and
``crop_top_lefts``, ``added_cond_kwargs``, ``torch.randint`` timesteps, ``noise_scheduler.add_noise``), with
``mnemoguard.Guard`` added exactly as the README's SDXL lines show (marked ``# guard``).

Run in-process by the tests (``main(argv)``) and by ``accelerate launch`` for the 2-process runs."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import script_common as common  # noqa: E402


def encode_prompt(text_encoders, tokenizers, prompt, text_input_ids_list=None):
    """Both CLIPs' penultimate hidden states, concatenated, and the second one's pooled output (diffusers' SDXL
    ``encode_prompt``)."""
    prompt_embeds_list = []
    for i, text_encoder in enumerate(text_encoders):
        if tokenizers is not None:
            text_input_ids = tokenizers[i](prompt, padding="max_length", max_length=tokenizers[i].model_max_length,
                                           truncation=True, return_tensors="pt").input_ids
        else:
            text_input_ids = text_input_ids_list[i]
        prompt_embeds = text_encoder(text_input_ids.to(text_encoder.device), output_hidden_states=True,
                                     return_dict=False)
        pooled_prompt_embeds = prompt_embeds[0]
        prompt_embeds = prompt_embeds[-1][-2]
        prompt_embeds_list.append(prompt_embeds)
    prompt_embeds = torch.concat(prompt_embeds_list, dim=-1)
    return prompt_embeds, pooled_prompt_embeds


def main(argv: list[str] | None = None):  # noqa: C901 - the shape of the diffusers script
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from mnemoguard import Guard

    args = common.parse_args(argv, "sdxl")
    accelerator = common.make_accelerator(args)
    model = args.pretrained_model_name_or_path
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer_one = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    tokenizer_two = AutoTokenizer.from_pretrained(model, subfolder="tokenizer_2")
    text_encoder_one = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    text_encoder_two = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for m in (vae, text_encoder_one, text_encoder_two, unet):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    text_encoders, tokenizers = [text_encoder_one, text_encoder_two], [tokenizer_one, tokenizer_two]
    common.lora_hooks(accelerator, StableDiffusionXLPipeline, "unet")
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)

    dataset = common.digits_dataset(args.max_train_samples, args.resolution)
    dataset["train"] = dataset["train"].add_column("index", range(len(dataset["train"])))  # guard
    to_pixels = common.pixel_transform(args.resolution)

    def preprocess_train(examples):
        examples = to_pixels(examples)
        captions = list(examples["text"])
        examples["input_ids_one"] = tokenizer_one(captions, max_length=tokenizer_one.model_max_length,
                                                  padding="max_length", truncation=True, return_tensors="pt").input_ids
        examples["input_ids_two"] = tokenizer_two(captions, max_length=tokenizer_two.model_max_length,
                                                  padding="max_length", truncation=True, return_tensors="pt").input_ids
        return examples

    train_dataset = dataset["train"].with_transform(preprocess_train)

    def collate_fn(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).float(),
                "input_ids_one": torch.stack([e["input_ids_one"] for e in examples]),
                "input_ids_two": torch.stack([e["input_ids_two"] for e in examples]),
                "original_sizes": [e["original_sizes"] for e in examples],
                "crop_top_lefts": [e["crop_top_lefts"] for e in examples],
                "captions": [example["text"] for example in examples],  # guard
                "indices": torch.tensor([example["index"] for example in examples])}  # guard

    train_dataloader = torch.utils.data.DataLoader(train_dataset, shuffle=True, collate_fn=collate_fn,
                                                   batch_size=args.train_batch_size,
                                                   generator=torch.Generator().manual_seed(args.seed))
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                          lr_scheduler)
    num_update_steps_per_epoch, num_train_epochs = common.epochs(args, train_dataloader)

    guard = Guard(args.guard_config, accelerator=accelerator, model=unet, noise_scheduler=noise_scheduler,  # guard
                  optimizer=optimizer, encode_prompt=lambda captions: encode_prompt(text_encoders, tokenizers,
                                                                                    captions),
                  tokenizer=tokenizer_one, vae=vae, train_dataset=dataset["train"], resolution=args.resolution,
                  max_steps=args.max_train_steps)
    if accelerator.is_main_process:
        accelerator.init_trackers("text2image-fine-tune")
    global_step, first_epoch, resume_step = common.resume(args, accelerator, num_update_steps_per_epoch)

    def compute_time_ids(original_size, crops_coords_top_left):
        target_size = (args.resolution, args.resolution)
        add_time_ids = list(original_size + crops_coords_top_left + target_size)
        return torch.tensor([add_time_ids]).to(accelerator.device)

    for epoch in range(first_epoch, num_train_epochs):
        unet.train()
        train_dataloader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dataloader, resume_step) if resume_step else train_dataloader
        resume_step = 0
        for batch in loader:
            with accelerator.accumulate(unet):
                model_input = vae.encode(batch["pixel_values"]).latent_dist.sample()
                model_input = model_input * vae.config.scaling_factor
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                timesteps = guard.sample_timesteps(bsz, model_input.device)  # guard
                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
                add_time_ids = torch.cat([compute_time_ids(s, c) for s, c in zip(batch["original_sizes"],
                                                                                 batch["crop_top_lefts"])])
                unet_added_conditions = {"time_ids": add_time_ids}
                prompt_embeds, pooled_prompt_embeds = encode_prompt(
                    text_encoders, None, None, text_input_ids_list=[batch["input_ids_one"], batch["input_ids_two"]])
                unet_added_conditions.update({"text_embeds": pooled_prompt_embeds})
                inputs = guard.before_forward(timesteps=timesteps, noisy_model_input=noisy_model_input,  # guard
                                              encoder_hidden_states=prompt_embeds,
                                              added_cond_kwargs=unet_added_conditions,
                                              captions=batch["captions"], indices=batch["indices"])
                model_pred = unet(noisy_model_input, timesteps, inputs["encoder_hidden_states"],
                                  added_cond_kwargs=inputs["added_cond_kwargs"], return_dict=False)[0]
                target = noise
                loss = guard.loss(F.mse_loss(model_pred.float(), target.float(), reduction="none"), inputs,  # guard
                                  model_pred=model_pred)
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
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(unet)))
        StableDiffusionXLPipeline.save_lora_weights(args.output_dir, unet_lora_layers=layers)
    guard.end(final_dir=args.output_dir)  # guard
    return common.record(args, accelerator, unet, global_step, guard)


if __name__ == "__main__":
    main()
