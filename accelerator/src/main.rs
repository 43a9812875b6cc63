fn main() {
    let _obj = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshaccel-ebpf"));
}
