"""eval.py's pictures: the results of --query / --image / --gallery drawn with pillow.

    draw_text_gallery    caption queries: each caption, then its k best images as thumbnails
    draw_image_gallery   image queries: each picture, then its k best captions
    thumb_box, caption_box, text_row_height, image_row_height, thumbnail: the layout, which
    the tests use to read the pictures back
"""
from utils import atomic_open

# The gallery's layout, shared with the tests that read pictures back.
THUMB, GAP, MARGIN, HEADER, CAPTION_H, LABEL_H, LINE_H = 112, 10, 12, 44, 26, 20, 22
GROUND_TRUTH = (0, 170, 60)   # the outline / mark of the ground truth
TEXT_WIDTH = 720              # image gallery: the column of captions


def text_row_height():
    return CAPTION_H + THUMB + LABEL_H + GAP


def thumb_box(row, rank):
    """Where the text gallery puts the rank-th (0-based) image of the row-th query."""
    x = MARGIN + rank * (THUMB + GAP)
    y = HEADER + row * text_row_height() + CAPTION_H
    return x, y, x + THUMB, y + THUMB


def image_row_height(k):
    return max(2 * THUMB + LABEL_H, LINE_H * (k + 1)) + 2 * GAP


def caption_box(row, k, rank):
    """Where the image gallery writes the rank-th (0-based) caption of the row-th query."""
    x = MARGIN + 2 * THUMB + 2 * GAP
    y = HEADER + row * image_row_height(k) + LINE_H * (rank + 1)
    return x, y, x + TEXT_WIDTH, y + LINE_H


def thumbnail(path, size=THUMB):
    """The picture at `path` scaled to fit size x size, centred on light gray."""
    from PIL import Image
    with Image.open(path) as picture:
        picture = picture.convert('RGB')
        scale = size / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.BICUBIC)
    tile = Image.new('RGB', (size, size), (235, 235, 235))
    tile.paste(picture, ((size - picture.width) // 2, (size - picture.height) // 2))
    return tile


def shorten_to_width(text, font, width):
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + '...') > width:
        text = text[:-1]
    return text + '...'


def draw_text_gallery(results, image_paths, title, path):
    """Caption queries: each row a caption, then its k best images left to right with rank and
    score under each, the ground truth outlined in green (thumb_box says where each one goes)."""
    from PIL import Image, ImageDraw, ImageFont
    k = max(len(r['indices']) for r in results)
    width = max(2 * MARGIN + k * THUMB + (k - 1) * GAP, 800)
    picture = Image.new('RGB', (width, HEADER + len(results) * text_row_height()), 'white')
    draw, font, small = ImageDraw.Draw(picture), ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    draw.text((MARGIN, 6), shorten_to_width(title, font, width - 2 * MARGIN), fill='black', font=font)
    draw.text((MARGIN, 25), shorten_to_width('each row: a caption, then the images ranked best for it, best first (#rank score); '
                                'green frame = the image the caption was written for', small, width - 2 * MARGIN),
              fill=(90, 90, 90), font=small)
    for row, r in enumerate(results):
        x, y = MARGIN, HEADER + row * text_row_height()
        draw.text((x, y + 4), shorten_to_width(f'"{r["query"]}"   {r["note"]}', font, width - 2 * MARGIN), fill='black', font=font)
        for rank, (index, score) in enumerate(zip(r['indices'], r['scores'])):
            box = thumb_box(row, rank)
            picture.paste(thumbnail(image_paths[index]), box[:2])
            if index in r['truth']:
                draw.rectangle([box[0] - 4, box[1] - 4, box[2] + 3, box[3] + 3], outline=GROUND_TRUTH, width=4)
            draw.text((box[0] + THUMB / 2, box[3] + 4), f'#{rank + 1}  {score:.4f}', fill='black', font=small, anchor='ma')
    save_png(picture, path)


def draw_image_gallery(results, query_paths, title, path):
    """Image queries: each row the image, then its k best captions with rank and score, the
    ground-truth captions on green (caption_box says where each one goes)."""
    from PIL import Image, ImageDraw, ImageFont
    k = max(len(r['indices']) for r in results)
    width = 2 * MARGIN + 2 * THUMB + 2 * GAP + TEXT_WIDTH
    picture = Image.new('RGB', (width, HEADER + len(results) * image_row_height(k)), 'white')
    draw, font, small = ImageDraw.Draw(picture), ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    draw.text((MARGIN, 6), shorten_to_width(title, font, width - 2 * MARGIN), fill='black', font=font)
    draw.text((MARGIN, 25), 'each row: an image, then the captions the model ranks best for it, best first '
              '(rank, score); on green = a caption written for this image', fill=(90, 90, 90), font=small)
    for row, r in enumerate(results):
        y = HEADER + row * image_row_height(k)
        picture.paste(thumbnail(query_paths[row], 2 * THUMB), (MARGIN, y))
        draw.text((MARGIN, y + 2 * THUMB + 3), shorten_to_width(r['query'], small, 2 * THUMB), fill='black', font=small)
        x0 = MARGIN + 2 * THUMB + 2 * GAP
        draw.text((x0, y + 3), shorten_to_width(r['note'], font, TEXT_WIDTH), fill=(90, 90, 90), font=font)
        for rank, (index, score) in enumerate(zip(r['indices'], r['scores'])):
            box = caption_box(row, k, rank)
            if index in r['truth']:
                draw.rectangle([box[0], box[1], box[2], box[3] - 2], fill=(200, 240, 205))
                draw.rectangle([box[0], box[1], box[0] + 5, box[3] - 2], fill=GROUND_TRUTH)
            draw.text((box[0] + 10, box[1] + 3), shorten_to_width(f'#{rank + 1}  {score:.4f}   {r["texts"][rank]}', font, TEXT_WIDTH - 14),
                      fill='black', font=font)
    save_png(picture, path)


def save_png(picture, path):
    with atomic_open(path) as f:
        picture.save(f, format='PNG')
