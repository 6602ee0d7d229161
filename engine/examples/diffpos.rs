use shadowmoe_engine::*;
fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u32> = st.tensor("prompt_ids").unwrap().data().chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect();
    let gl: Vec<f32> = st.tensor("logits").unwrap().data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let re: Vec<u32> = st.tensor("router_experts").unwrap().data().chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect();
    let ck = Checkpoint::open_dir(&dir).unwrap();
    let m = ck.load_model().unwrap();
    let mut obs = RecordingObserver::default();
    let mut c = m.new_cache();
    let l = m.forward(&ids, &mut c, Phase::Prefill, LogitsFor::All, &mut obs).unwrap();
    let v = l.ncols();
    for t in 0..ids.len() { let d = (0..v).map(|j| (l[[t,j]] - gl[t*v+j]).abs()).fold(0f32, f32::max); print!("{t}:{d:.1e} "); }
    println!();
    let k = ck.config.num_experts_per_tok; let t = ids.len();
    for (i, e) in obs.events.iter().enumerate() { let want = &re[i*k..(i+1)*k]; if e.experts != want { println!("route mismatch layer {} tok {}: ours {:?} {:?} golden {:?}", e.layer, e.position, e.experts, e.weights, want); } }
    let _ = t;
}
