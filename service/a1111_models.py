"""AUTOMATIC1111's API (`/sdapi/v1/*`): its bodies, and the translation to this API's request and back.

The request is A1111's `StableDiffusionProcessingTxt2Img` as its API publishes it (modules/api/models.py
and modules/processing.py of AUTOMATIC1111/stable-diffusion-webui, v1.10), with A1111's defaults, so
`parameters` echoes a request as A1111 does. Like A1111, unknown fields are ignored (SillyTavern sends
its own `url` and `auth` beside A1111's). `to_txt2img` turns it into this API's txt2img request, which
validates it once more with the deployment's bounds (service/api_models.py): every A1111 field either
maps onto the one description of a generation (schemas/generation.py), changes nothing here (accepted
and ignored: saving on the server, hires. fix settings while it is off, ...), or would change the
picture in a way this server does not implement: then it is a 422 naming the field, never ignored.

Depends on pydantic only (the API image has no torch, no PIL): PNG text is read by hand.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from schemas.generation import Generation, json_float, json_int
from schemas.samplers import SAMPLERS, SCHEDULER_LABELS, SCHEDULERS, UnknownName, resolve_sampler
from service.api_models import Txt2ImgRequestBase, edit_request_model, request_model
from service.settings import Settings

Int = json_int()
Float = json_float()
Count = json_int(ge=1)

# A1111's own aliases of its sampler names (GET /sdapi/v1/samplers lists them; requests may use them).
A1111_SAMPLER_ALIASES: dict[str, tuple[str, ...]] = {
    "ddim": ("ddim",),
    "euler": ("k_euler",),
    "euler_ancestral": ("k_euler_a", "k_euler_ancestral"),
    "dpmpp_2m": ("k_dpmpp_2m",),
    "dpmpp_2m_sde": ("k_dpmpp_2m_sde",),
    "uni_pc": ("unipc",),
    "lcm": ("k_lcm",),
}
_ALIAS_TO_SAMPLER = {alias: name for name, aliases in A1111_SAMPLER_ALIASES.items() for alias in aliases}
# The schedule A1111's "Automatic" gives each sampler (its options["scheduler"]; the others: uniform).
AUTOMATIC_SCHEDULE = {"dpmpp_2m": "karras", "dpmpp_2m_sde": "exponential"}
# Samplers whose ancestral noise A1111 scales by `eta` (1 by default): ours always draw all of it.
FULL_NOISE_SAMPLERS = frozenset({"euler_ancestral", "dpmpp_2m_sde"})

# GET /sdapi/v1/options beside `sd_model_checkpoint`: A1111's options that say how this server draws.
# POST /options and `override_settings` may repeat them unchanged; another value is a 422.
FIXED_OPTIONS: dict[str, Any] = {
    "sd_checkpoint_hash": None,
    "sd_vae": "Automatic",  # the model's own VAE
    "CLIP_stop_at_last_layers": 1,
    "eta_ddim": 0.0,
    "eta_ancestral": 1.0,
    "eta_noise_seed_delta": 0,
    "randn_source": "CPU",  # torch.randn on a CPU generator seeded per image, as A1111's "CPU"
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 0.0,
    "s_noise": 1.0,
    "s_min_uncond": 0.0,
    "samples_format": "png",
    "enable_pnginfo": True,
    "return_grid": False,
    "live_previews_enable": True,
}
# Options with another accepted spelling of the same behaviour.
EQUIVALENT_OPTIONS: dict[str, tuple[Any, ...]] = {"sd_vae": ("Automatic", "None", None, "")}
# Options about files A1111 writes on its own disk: this server writes none, any value changes nothing.
IGNORED_OPTIONS = frozenset(
    {
        "samples_save",
        "grid_save",
        "save_to_dirs",
        "grid_save_to_dirs",
        "save_txt",
        "save_images_add_number",
        "samples_filename_pattern",
        "outdir_samples",
        "outdir_txt2img_samples",
        "outdir_grids",
        "outdir_txt2img_grids",
        "jpeg_quality",
        "export_for_4chan",
    }
)


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img. Left out (or null): steps, cfg_scale, width, height and the sampler take
    the served model's defaults (A1111: 50, 7, 512x512, Euler)."""

    model_config = ConfigDict(extra="ignore")  # as A1111: clients add fields of their own

    prompt: StrictStr | None = ""
    negative_prompt: StrictStr | None = ""
    styles: list[StrictStr] | None = None
    seed: Int | None = -1
    subseed: Int | None = -1
    subseed_strength: Float | None = 0.0
    seed_resize_from_h: Int | None = -1
    seed_resize_from_w: Int | None = -1
    sampler_name: StrictStr | None = None
    sampler_index: StrictStr | None = None
    scheduler: StrictStr | None = None
    batch_size: Count | None = 1
    n_iter: Count | None = 1
    steps: Int | None = None
    cfg_scale: Float | None = None
    width: Int | None = None
    height: Int | None = None
    restore_faces: StrictBool | None = None
    tiling: StrictBool | None = None
    do_not_save_samples: StrictBool | None = False
    do_not_save_grid: StrictBool | None = False
    eta: Float | None = None
    denoising_strength: Float | None = 0.75
    s_min_uncond: Float | None = None
    s_churn: Float | None = None
    s_tmax: Float | None = None
    s_tmin: Float | None = None
    s_noise: Float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: StrictBool | None = True
    refiner_checkpoint: StrictStr | None = None
    refiner_switch_at: Float | None = None
    disable_extra_networks: StrictBool | None = False
    firstpass_image: StrictStr | None = None
    comments: dict[str, Any] | None = None
    enable_hr: StrictBool | None = False
    firstphase_width: Int | None = 0
    firstphase_height: Int | None = 0
    hr_scale: Float | None = 2.0
    hr_upscaler: StrictStr | None = None
    hr_second_pass_steps: Int | None = 0
    hr_resize_x: Int | None = 0
    hr_resize_y: Int | None = 0
    hr_checkpoint_name: StrictStr | None = None
    hr_sampler_name: StrictStr | None = None
    hr_scheduler: StrictStr | None = None
    hr_prompt: StrictStr | None = ""
    hr_negative_prompt: StrictStr | None = ""
    force_task_id: StrictStr | None = None
    script_name: StrictStr | None = None
    script_args: list[Any] | None = Field(default_factory=list)
    send_images: StrictBool | None = True
    save_images: StrictBool | None = False
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)
    infotext: StrictStr | None = None


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: A1111's StableDiffusionProcessingImg2Img as its API publishes it. One init
    image (base64, a data: URL prefix accepted), a mask to inpaint (white repainted), `denoising_strength`
    (default 0.75), `mask_blur` (4), `resize_mode` 0 (Just resize), 1 (Crop and resize) or 2 (Resize and
    fill). The masked area starts from the original image, A1111's "original" (`inpainting_fill` 1): the
    API's default 0 ("fill", what every client sends unless told otherwise) is taken as that too, 2 and 3
    (latent noise, latent nothing) are refused, as are "Only masked" inpainting (`inpaint_full_res` true
    with a mask), an inverted mask and soft masks (`mask_round` false): each would change the picture."""

    init_images: list[StrictStr] | None = None
    resize_mode: Int | None = 0
    image_cfg_scale: Float | None = None  # instruct-pix2pix only: no effect on other models, as in A1111
    mask: StrictStr | None = None
    mask_blur_x: Int | None = 4
    mask_blur_y: Int | None = 4
    mask_blur: Int | None = None
    mask_round: StrictBool | None = True
    inpainting_fill: Int | None = 0
    inpaint_full_res: StrictBool | None = True
    inpaint_full_res_padding: Int | None = 0
    inpainting_mask_invert: Int | None = 0
    initial_noise_multiplier: Float | None = None
    latent_mask: StrictStr | None = None
    include_init_images: StrictBool | None = False


# A1111's resize_mode numbers; 3, "Just resize (latent upscale)", is not implemented.
A1111_RESIZE_MODES = {0: "resize", 1: "crop", 2: "fill"}
ACCEPTED_INPAINTING_FILL = (0, 1)  # Img2ImgRequest's docstring


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="The PNGs, base64-encoded (none when send_images is false).")
    parameters: dict[str, Any] = Field(description="The request, as A1111 echoes it.")
    info: str = Field(description="A JSON document: seeds, sizes, sampler, infotexts... (A1111's `js()`).")


class ProgressResponse(BaseModel):
    progress: float = Field(description="0 to 1: this API key's current job (0 when it has none).")
    eta_relative: float = Field(description="Seconds left, estimated.")
    state: dict[str, Any]
    current_image: str | None = Field(None, description="A preview of the running job, base64 PNG.")
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float | None
    need_inner_model: bool | None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


# --- errors -------------------------------------------------------------------------------------


class Refusals:
    """The 422 issues of one request, all reported at once (FastAPI's shape)."""

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []

    def add(self, loc: Sequence[str], msg: str, kind: str = "unsupported_value") -> None:
        self.errors.append({"loc": ("body", *loc), "msg": msg, "type": kind})

    def raise_any(self) -> None:
        if self.errors:
            raise RequestValidationError(self.errors)


# Our request's field names in A1111's terms (a 422 names the field the client sent).
TO_A1111_FIELD = {
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size",
    "sampler": "sampler_name",
    "strength": "denoising_strength",
}


def rename_error_locations(errors: Sequence[Any], sampler_field: str = "sampler_name") -> list[dict]:
    """Validation errors of our request model located at the A1111 fields a client sent."""
    renamed = []
    for error in errors:
        loc = [part for part in error.get("loc", ()) if part != "body"]
        if loc and isinstance(loc[0], str):
            loc[0] = sampler_field if loc[0] == "sampler" else TO_A1111_FIELD.get(loc[0], loc[0])
        renamed.append({**error, "loc": ("body", *loc)})
    return renamed


# --- request: A1111 -> ours -----------------------------------------------------------------------


def model_named(name: object, served: Sequence[str]) -> str | None:
    """The served model a checkpoint title or model name means, or None."""
    return name if isinstance(name, str) and name in served else None


def _served_names(served: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in served) or "none (no live worker)"


def check_option(refusals: Refusals, loc: Sequence[str], key: str, value: Any, served: Sequence[str]) -> None:
    """One option of `override_settings` or POST /options: the served model, a fixed option repeated,
    or one about A1111's own files; anything else would change what we cannot change."""
    if key == "sd_model_checkpoint":
        if value is not None and served and model_named(value, served) is None:
            refusals.add(
                loc, f"model {value!r} is not served; served: {_served_names(served)}", "unknown_model"
            )
    elif key == "forge_additional_modules":  # SD Forge's extra VAE / text encoders
        if value:
            refusals.add(loc, "extra modules (a VAE, text encoders) are not implemented: send [] or null")
    elif key in FIXED_OPTIONS:
        if value != FIXED_OPTIONS[key] and value not in EQUIVALENT_OPTIONS.get(key, ()):
            refusals.add(
                loc,
                f"{key} is {FIXED_OPTIONS[key]!r} on this server and cannot be changed (got {value!r})",
                "fixed_option",
            )
    elif key not in IGNORED_OPTIONS:
        refusals.add(
            loc,
            f"option {key!r} is not implemented by this server (settable: sd_model_checkpoint; fixed: "
            f"{', '.join(FIXED_OPTIONS)})",
            "unknown_option",
        )


def _refuse_what_changes_the_picture(body: Txt2ImgRequest, refusals: Refusals, served: Sequence[str]) -> None:
    """A1111 fields that would change the picture in ways this server does not implement."""
    off = "is not implemented by this server: send {} or leave it out"
    if body.enable_hr:
        refusals.add(("enable_hr",), "hires. fix " + off.format("false"))
    if body.restore_faces:
        refusals.add(("restore_faces",), "face restoration " + off.format("false"))
    if body.tiling:
        refusals.add(("tiling",), "tiling " + off.format("false"))
    if body.styles:
        refusals.add(("styles",), "prompt styles " + off.format("[]") + " (this server has none)")
    if body.subseed_strength:
        refusals.add(("subseed_strength",), "variation seeds " + off.format("0"))
    for name in ("seed_resize_from_h", "seed_resize_from_w"):
        if (getattr(body, name) or 0) > 0:
            refusals.add((name,), "resizing the seed's noise " + off.format("-1 or 0"))
    if body.s_churn:
        refusals.add(("s_churn",), "sigma churn " + off.format("0"))
    if body.s_noise is not None and body.s_noise != 1:
        refusals.add(("s_noise",), "a noise multiplier " + off.format("1"))
    if body.s_min_uncond:
        refusals.add(("s_min_uncond",), "negative guidance minimum sigma " + off.format("0"))
    if body.refiner_checkpoint and body.refiner_checkpoint != "None":
        refusals.add(("refiner_checkpoint",), "a refiner model " + off.format("null"))
    if body.script_name:
        refusals.add(("script_name",), "scripts are not implemented by this server (it has none)")
    for name in body.alwayson_scripts or {}:
        refusals.add(("alwayson_scripts", name), "scripts are not implemented by this server (it has none)")
    if body.infotext:
        refusals.add(
            ("infotext",), "reading settings from an infotext " + off.format("null") + " (send the fields)"
        )
    for key, value in (body.override_settings or {}).items():
        check_option(refusals, ("override_settings", key), key, value, served)


def _sampler_fields(body: Txt2ImgRequest, default_sampler: str, refusals: Refusals) -> dict[str, Any]:
    """sampler, scheduler and eta in our terms: A1111's aliases, its "Automatic" schedule per sampler,
    and eta where it changes the picture."""
    fields: dict[str, Any] = {}
    name = body.sampler_name or body.sampler_index
    sampler, implied = default_sampler, None
    if name:
        fields["sampler"] = _ALIAS_TO_SAMPLER.get(name.strip().lower(), name)
        try:
            sampler, implied = resolve_sampler(fields["sampler"])
        except UnknownName:
            sampler = None  # the request model names the valid ones
    automatic = body.scheduler is None or body.scheduler.strip().lower() == "automatic"
    if not automatic:
        fields["scheduler"] = body.scheduler
    elif name and sampler in AUTOMATIC_SCHEDULE and implied is None:
        fields["scheduler"] = AUTOMATIC_SCHEDULE[sampler]
    if sampler == "ddim" and body.eta is not None:
        fields["eta"] = body.eta
    elif sampler in FULL_NOISE_SAMPLERS and body.eta is not None and body.eta != 1:
        label = SAMPLERS[sampler].label
        refusals.add(("eta",), f"{label} here always adds its full ancestral noise (eta 1): send 1 or null")
    return fields


def to_txt2img(
    body: Txt2ImgRequest, settings: Settings, served: Sequence[str], default_sampler: str
) -> Txt2ImgRequestBase:
    """This API's txt2img request for an A1111 body (with previews on, for /sdapi/v1/progress), or a
    422 RequestValidationError naming every A1111 field at fault."""
    fields = _translate(body, settings, served, default_sampler, Refusals())
    return _validated(request_model(settings), fields, body)


def to_img2img(
    body: Img2ImgRequest, settings: Settings, served: Sequence[str], default_sampler: str
) -> tuple[Txt2ImgRequestBase, str, str | None]:
    """(This API's request with images, the init image's base64, the mask's or None) for an A1111 img2img
    body (its images not yet checked: service/input_images.py), or a 422 naming every field at fault."""
    refusals = Refusals()
    images = body.init_images or []
    if len(images) != 1:
        refusals.add(
            ("init_images",), f"send exactly one init image (got {len(images)})", "init_images_count"
        )
    if (body.resize_mode or 0) not in A1111_RESIZE_MODES:
        modes = ", ".join(f"{number} ({name})" for number, name in A1111_RESIZE_MODES.items())
        refusals.add(("resize_mode",), f"resize_mode {body.resize_mode} is not implemented: send {modes}")
    if body.mask is not None:
        if (body.inpainting_fill or 0) not in ACCEPTED_INPAINTING_FILL:
            refusals.add(
                ("inpainting_fill",),
                f"masked content {body.inpainting_fill} (latent noise or nothing) is not implemented: the "
                "masked area starts from the original image; send 1 (original) or 0",
            )
        if body.inpaint_full_res:
            refusals.add(
                ("inpaint_full_res",),
                "inpainting only the masked area at full resolution is not implemented: send false (whole picture)",
            )
        if body.inpainting_mask_invert:
            refusals.add(
                ("inpainting_mask_invert",),
                "an inverted mask is not implemented: send 0 (white is repainted)",
            )
        if body.mask_round is False:
            refusals.add(("mask_round",), "soft masks are not implemented (the mask is binarized): send true")
    if body.initial_noise_multiplier not in (None, 1):
        refusals.add(("initial_noise_multiplier",), "a noise multiplier is not implemented: send 1 or null")
    if body.latent_mask:
        refusals.add(("latent_mask",), "a separate latent mask is not implemented: send null")
    mask_blur = body.mask_blur
    if mask_blur is None:  # A1111: mask_blur sets both; else mask_blur_x and mask_blur_y
        if body.mask_blur_x != body.mask_blur_y:
            refusals.add(
                ("mask_blur_x",),
                "different horizontal and vertical blurs are not implemented: send mask_blur",
            )
        mask_blur = body.mask_blur_x
    fields = _translate(body, settings, served, default_sampler, refusals)
    if body.denoising_strength is not None:
        fields["strength"] = body.denoising_strength
    if mask_blur is not None:
        fields["mask_blur"] = mask_blur
    fields["resize_mode"] = A1111_RESIZE_MODES[body.resize_mode or 0]
    return _validated(edit_request_model(settings), fields, body), images[0], body.mask


def _translate(
    body: Txt2ImgRequest, settings: Settings, served: Sequence[str], default_sampler: str, refusals: Refusals
) -> dict[str, Any]:
    """The fields of our request an A1111 body gives, or a 422 naming each field at fault (`refusals`
    holds those found before)."""
    _refuse_what_changes_the_picture(body, refusals, served)
    if body.seed is not None and body.seed < -1:
        refusals.add(
            ("seed",), f"Input should be -1 (random) or from 0 (got {body.seed})", "greater_than_equal"
        )
    batch_size, n_iter = body.batch_size or 1, body.n_iter or 1
    if batch_size * n_iter > settings.max_num_images:
        refusals.add(
            ("batch_size" if n_iter == 1 else "n_iter",),
            f"batch_size x n_iter = {batch_size} x {n_iter} = {batch_size * n_iter} images; this server "
            f"makes at most {settings.max_num_images} per request (SD_MAX_NUM_IMAGES)",
            "too_many_images",
        )
    fields: dict[str, Any] = {
        "prompt": body.prompt or "",
        "negative_prompt": body.negative_prompt or "",
        "num_images": batch_size * n_iter,
        "preview": True,
        **_sampler_fields(body, default_sampler, refusals),
    }
    refusals.raise_any()
    for ours, theirs in (
        ("steps", "steps"),
        ("guidance_scale", "cfg_scale"),
        ("width", "width"),
        ("height", "height"),
    ):
        if getattr(body, theirs) is not None:
            fields[ours] = getattr(body, theirs)
    if body.seed is not None and body.seed >= 0:
        fields["seed"] = body.seed
    return fields


def _validated(
    model: type[Txt2ImgRequestBase], fields: dict[str, Any], body: Txt2ImgRequest
) -> Txt2ImgRequestBase:
    """`fields` validated by our request `model`; its errors located at A1111's fields (422)."""
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        sampler_field = "sampler_name" if body.sampler_name else "sampler_index"
        raise RequestValidationError(
            rename_error_locations(error.errors(include_url=False), sampler_field)
        ) from None


def options_update(body: dict[str, Any], served: Sequence[str]) -> tuple[bool, str | None]:
    """POST /sdapi/v1/options: (whether it sets the caller's model, that model or None to forget it);
    a 422 naming each option this server cannot change."""
    refusals = Refusals()
    for key, value in body.items():
        check_option(refusals, (key,), key, value, served)
    if "sd_model_checkpoint" in body and body["sd_model_checkpoint"] is not None and not served:
        refusals.add(("sd_model_checkpoint",), "no model is served now (no live worker); retry later")
    refusals.raise_any()
    if "sd_model_checkpoint" not in body:
        return False, None
    return True, model_named(body["sd_model_checkpoint"], served)


# --- answers: ours -> A1111 -----------------------------------------------------------------------


def info_document(
    body: Txt2ImgRequest,
    params: Generation,
    model: str | None,
    infotexts: list[str],
    created_at: datetime | None,
    warnings: list[str] | None = None,
) -> str:
    """A1111's `info` (processing.py: Processed.js) for a job that ran with `params`, plus our
    `warnings` (JobResult.warnings; A1111 has no such key, its clients read the ones they know)."""
    seeds = params.image_seeds()
    count = len(seeds)
    subseed = body.subseed if body.subseed is not None else -1
    return json.dumps(
        {
            "prompt": params.prompt,
            "all_prompts": [params.prompt] * count,
            "negative_prompt": params.negative_prompt,
            "all_negative_prompts": [params.negative_prompt] * count,
            "seed": params.seed,
            "all_seeds": seeds,
            "subseed": subseed,
            "all_subseeds": [subseed + i if subseed >= 0 else subseed for i in range(count)],
            "subseed_strength": 0.0,
            "width": params.width,
            "height": params.height,
            "sampler_name": SAMPLERS[params.sampler].label,
            "cfg_scale": params.guidance_scale,
            "steps": params.steps,
            "batch_size": body.batch_size or 1,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": model,
            "sd_model_hash": None,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": body.denoising_strength,
            "extra_generation_params": {},  # A1111 writes the schedule in the infotexts, as we do
            "index_of_first_image": 0,  # never a grid first
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": created_at.strftime("%Y%m%d%H%M%S") if created_at else "",
            "clip_skip": 1,
            "is_using_inpainting_conditioning": False,
            "version": "sdserve",
            "warnings": warnings or [],
        }
    )


def sampler_items() -> list[SamplerItem]:
    """GET /sdapi/v1/samplers: A1111's names, its aliases (and ours), what "Automatic" means for each."""
    items = []
    for name, info in SAMPLERS.items():
        aliases = [*A1111_SAMPLER_ALIASES.get(name, ()), name, *info.aliases]
        options: dict[str, Any] = {"schedulers": [a1111_scheduler_name(s) for s in info.schedulers]}
        if name in AUTOMATIC_SCHEDULE:
            options["scheduler"] = AUTOMATIC_SCHEDULE[name]
        items.append(SamplerItem(name=info.label, aliases=list(dict.fromkeys(aliases)), options=options))
    return items


def a1111_scheduler_name(scheduler: str) -> str:
    """A1111's lowercase name of one of our schedules ("normal" is its "uniform")."""
    return SCHEDULER_LABELS[scheduler].lower().replace(" ", "_")


def scheduler_items() -> list[SchedulerItem]:
    """GET /sdapi/v1/schedulers: "automatic" and ours under A1111's names (each is accepted)."""
    items = [
        SchedulerItem(
            name="automatic", label="Automatic", aliases=None, default_rho=None, need_inner_model=None
        )
    ]
    for scheduler in SCHEDULERS:
        name = a1111_scheduler_name(scheduler)
        items.append(
            SchedulerItem(
                name=name,
                label=SCHEDULER_LABELS[scheduler],
                aliases=[scheduler] if scheduler != name else None,
                default_rho=7.0 if scheduler == "karras" else None,
                need_inner_model=name in ("uniform", "sgm_uniform"),
            )
        )
    return items


def model_item(name: str) -> SDModelItem:
    """A served model as A1111 lists a checkpoint (no file hash: workers publish none)."""
    return SDModelItem(title=name, model_name=name, hash=None, sha256=None, filename=name, config=None)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_text(png: bytes, key: str = "parameters") -> str | None:
    """The text chunk `key` of PNG bytes (tEXt, zTXt or iTXt), or None."""
    if not png.startswith(PNG_SIGNATURE):
        return None
    position, wanted = len(PNG_SIGNATURE), key.encode("latin-1")
    while position + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[position : position + 8])
        data = png[position + 8 : position + 8 + length]
        position += 12 + length  # length, type, data, CRC
        name, _, rest = data.partition(b"\0")
        if kind == b"IEND":
            break
        if name != wanted:
            continue
        if kind == b"tEXt":
            return rest.decode("latin-1")
        if kind == b"zTXt":
            return zlib.decompress(rest[1:]).decode("latin-1")
        if kind == b"iTXt":
            compressed, text = rest[0], rest[2:].split(b"\0", 2)[-1]  # language, translated keyword
            return (zlib.decompress(text) if compressed else text).decode("utf-8")
    return None
