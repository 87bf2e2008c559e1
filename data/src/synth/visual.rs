//! One clip's frames: a class's shape and colour moving over a textured background, at
//! contrast, size and pixel noise per cue.

use super::{normals, Cue};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use xkd_config::DataConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Shape {
    Circle,
    Square,
    Triangle,
    Cross,
    Ring,
    HorizontalBar,
    Diamond,
    VerticalBar,
}

const SHAPES: [Shape; 8] = [
    Shape::Circle,
    Shape::Square,
    Shape::Triangle,
    Shape::Cross,
    Shape::Ring,
    Shape::HorizontalBar,
    Shape::Diamond,
    Shape::VerticalBar,
];

/// Saturated colours, far from the grey backgrounds.
const COLOURS: [[f32; 3]; 6] = [
    [0.90, 0.15, 0.10], // red
    [0.10, 0.80, 0.20], // green
    [0.15, 0.30, 0.95], // blue
    [0.95, 0.85, 0.10], // yellow
    [0.85, 0.15, 0.80], // magenta
    [0.10, 0.85, 0.90], // cyan
];

/// Object radius as a share of the frame side.
const CLEAR_RADIUS: f32 = 0.20;
const SUBTLE_RADIUS: f32 = 0.17;
/// Share of the object's colour difference from the background that survives.
const SUBTLE_CONTRAST: f32 = 0.6;
/// Per-pixel noise standard deviation, in [0, 1] intensity.
const CLEAR_PIXEL_NOISE: f32 = 0.03;
const SUBTLE_PIXEL_NOISE: f32 = 0.06;
/// Movement per frame as a share of the frame side.
const SPEED: f32 = 0.08;

/// What identifies a class by eye: shape, colour and direction of motion.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct VisualSignature {
    pub(super) shape: Shape,
    pub(super) colour: usize,
    /// Direction in eighths of a turn; 0 = rightwards, 2 = downwards.
    pub(super) direction: usize,
}

/// Classes sharing a shape (every 8th label) differ in both colour and direction, so the
/// (shape, colour, motion) triple is unique and no two classes are one attribute apart unless
/// their shapes differ.
pub(super) fn visual_signature(label: usize) -> VisualSignature {
    let round = label / SHAPES.len();
    VisualSignature {
        shape: SHAPES[label % SHAPES.len()],
        colour: (label + 2 * round) % COLOURS.len(),
        direction: (label + 3 * round) % 8,
    }
}

fn inside(shape: Shape, dx: f32, dy: f32, r: f32) -> bool {
    let (ax, ay) = (dx.abs(), dy.abs());
    match shape {
        Shape::Circle => dx * dx + dy * dy <= r * r,
        Shape::Square => ax <= 0.8 * r && ay <= 0.8 * r,
        // Apex up (y grows downwards), base at 0.7 r below the centre.
        Shape::Triangle => dy >= -r && dy <= 0.7 * r && ax <= 0.6 * (dy + r),
        Shape::Cross => (ax <= 0.3 * r && ay <= r) || (ay <= 0.3 * r && ax <= r),
        Shape::Ring => {
            let d2 = dx * dx + dy * dy;
            d2 <= r * r && d2 >= 0.3 * r * r
        }
        Shape::HorizontalBar => ax <= r && ay <= 0.35 * r,
        Shape::Diamond => ax + ay <= r,
        Shape::VerticalBar => ay <= r && ax <= 0.35 * r,
    }
}

/// One `[H, W, 3]` u8 image per frame: background, a distractor, then the class's object.
pub(super) fn synth_frames(
    cfg: &DataConfig,
    label: usize,
    cue: Cue,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<u8>> {
    let side = cfg.frame_size as f32;
    let background = background(rng);
    let (radius_share, contrast, pixel_noise) = match cue {
        Cue::Clear => (CLEAR_RADIUS, 1.0, CLEAR_PIXEL_NOISE),
        Cue::Subtle => (SUBTLE_RADIUS, SUBTLE_CONTRAST, SUBTLE_PIXEL_NOISE),
    };
    let class_object = moving_object(visual_signature(label), radius_share, contrast, side, rng);
    let distractor = moving_object(
        random_signature(rng),
        SUBTLE_RADIUS,
        SUBTLE_CONTRAST,
        side,
        rng,
    );
    let half_path = (cfg.frames as f32 - 1.0) / 2.0;
    (0..cfg.frames)
        .map(|t| {
            let time = t as f32 - half_path;
            let objects = [distractor.at(time), class_object.at(time)];
            render_frame(cfg.frame_size, &background, &objects, pixel_noise, rng)
        })
        .collect()
}

/// Any look at all: what an unrelated thing in the scene looks like.
fn random_signature(rng: &mut ChaCha8Rng) -> VisualSignature {
    VisualSignature {
        shape: SHAPES[rng.random_range(0..SHAPES.len())],
        colour: rng.random_range(0..COLOURS.len()),
        direction: rng.random_range(0..8),
    }
}

/// An object with a straight path through a jittered midpoint, per-clip size, brightness,
/// contrast (+-20% of the nominal) and speed.
fn moving_object(
    signature: VisualSignature,
    radius_share: f32,
    contrast: f32,
    side: f32,
    rng: &mut ChaCha8Rng,
) -> MovingObject {
    let radius = side * radius_share * rng.random_range(0.85..1.15);
    let brightness = rng.random_range(0.85..1.15);
    let colour = COLOURS[signature.colour].map(|c| (c * brightness).clamp(0.0, 1.0));
    let contrast = (contrast * rng.random_range(0.8..1.2)).min(1.0);
    let angle = signature.direction as f32 * std::f32::consts::FRAC_PI_4;
    let speed = side * SPEED * rng.random_range(0.8..1.2);
    let mid_x = side / 2.0 + side * rng.random_range(-0.12..0.12);
    let mid_y = side / 2.0 + side * rng.random_range(-0.12..0.12);
    MovingObject {
        shape: signature.shape,
        mid: (mid_x, mid_y),
        velocity: (speed * angle.cos(), speed * angle.sin()),
        radius,
        colour,
        contrast,
    }
}

struct MovingObject {
    shape: Shape,
    mid: (f32, f32),
    /// Pixels per frame.
    velocity: (f32, f32),
    radius: f32,
    colour: [f32; 3],
    contrast: f32,
}

impl MovingObject {
    /// Where it is `time` frames after the middle of the clip.
    fn at(&self, time: f32) -> Object {
        Object {
            shape: self.shape,
            cx: self.mid.0 + self.velocity.0 * time,
            cy: self.mid.1 + self.velocity.1 * time,
            radius: self.radius,
            colour: self.colour,
            contrast: self.contrast,
        }
    }
}

/// A grey with a slight tint and a gentle gradient, different per clip.
struct Background {
    base: [f32; 3],
    gradient: (f32, f32),
}

impl Background {
    fn at(&self, x: f32, y: f32, side: f32) -> [f32; 3] {
        let shade = self.gradient.0 * (x / side - 0.5) + self.gradient.1 * (y / side - 0.5);
        self.base.map(|c| c + shade)
    }
}

fn background(rng: &mut ChaCha8Rng) -> Background {
    let grey: f32 = rng.random_range(0.35..0.6);
    let base = [0; 3].map(|_| grey + rng.random_range(-0.05..0.05));
    let gradient = (rng.random_range(-0.1..0.1), rng.random_range(-0.1..0.1));
    Background { base, gradient }
}

struct Object {
    shape: Shape,
    cx: f32,
    cy: f32,
    radius: f32,
    colour: [f32; 3],
    contrast: f32,
}

/// Paints `objects` in order over the background, then adds per-pixel noise.
fn render_frame(
    size: usize,
    background: &Background,
    objects: &[Object],
    pixel_noise: f32,
    rng: &mut ChaCha8Rng,
) -> Vec<u8> {
    let side = size as f32;
    let noise = normals(size * size * 3, rng);
    let mut pixels = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            // Pixel centres, so shapes are symmetric about their centre.
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let mut clean = background.at(px, py, side);
            for object in objects {
                if inside(object.shape, px - object.cx, py - object.cy, object.radius) {
                    for (v, target) in clean.iter_mut().zip(object.colour) {
                        *v += object.contrast * (target - *v);
                    }
                }
            }
            for v in clean {
                let value = v + pixel_noise * noise[pixels.len()] as f32;
                pixels.push((value.clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
    }
    pixels
}
