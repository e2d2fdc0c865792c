# BAAI's multimodal_understanding.py (github.com/baaivision/Emu3) on this MindSpore port.
# Changed from BAAI's script: the imports (the block below), and the device and dtype constants
# ("cuda:0" -> "cpu", bfloat16 -> float32: the CPU has no bf16 kernels; on Ascend use "npu:0" and
# mindspore.bfloat16). Every call is BAAI's. The hub ids are read from the local Hugging Face cache
# (`huggingface-cli download BAAI/Emu3-Chat`, ...); nothing is downloaded.
from PIL import Image
from emu3.transformers_compat import AutoTokenizer, AutoModel, AutoImageProcessor, AutoModelForCausalLM
from emu3.transformers_compat import GenerationConfig
import mindspore

from emu3.mllm import Emu3Processor


# model path
EMU_HUB = "BAAI/Emu3-Chat"
VQ_HUB = "BAAI/Emu3-VisionTokenizer"

# prepare model and processor
model = AutoModelForCausalLM.from_pretrained(
    EMU_HUB,
    device_map="cpu",
    torch_dtype=mindspore.float32,
    attn_implementation="flash_attention_2",
    trust_remote_code=True,
)

tokenizer = AutoTokenizer.from_pretrained(EMU_HUB, trust_remote_code=True)
image_processor = AutoImageProcessor.from_pretrained(VQ_HUB, trust_remote_code=True)
image_tokenizer = AutoModel.from_pretrained(VQ_HUB, device_map="cpu", trust_remote_code=True).eval()
processor = Emu3Processor(image_processor, image_tokenizer, tokenizer)

# prepare input
text = "Please describe the image"
image = Image.open("assets/demo.png")

inputs = processor(
    text=text,
    image=image,
    mode='U',
    padding_side="left",
    padding="longest",
    return_tensors="pt",
)

# prepare hyper parameters
GENERATION_CONFIG = GenerationConfig(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)

# generate
outputs = model.generate(
    inputs.input_ids.to("cpu"),
    GENERATION_CONFIG,
    max_new_tokens=320,
)

outputs = outputs[:, inputs.input_ids.shape[-1]:]
print(processor.batch_decode(outputs, skip_special_tokens=True)[0])
